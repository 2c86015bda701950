"""A Ray Tune study over a training stage: each trial is one full r1ray training run.

    python jobs/tune.py --config configs/tune/debug.yaml

Each trial is a function trainable holding a token CPU; inside it the stage's own ``run`` builds and
fits a ``TorchTrainer`` (Ray Train V2 cannot be handed to a Tuner directly), and
``TuneReportCallback`` forwards every ``ray.train.report`` (validation loss included) to Tune, so ASHA
sees each evaluation. PBT needs Tune checkpoints, which Train V2 does not forward: a PBT trial trains in
segments of ``perturbation_interval`` steps, each resuming from the previous segment's checkpoint, and
reports that checkpoint to Tune, so exploitation copies real DeepSpeed state between trials.

Outputs under ``<storage.root>/tune/<name>``: ``trials.csv``/``trials.parquet`` (every trial's config and
metrics), ``best.yaml`` (the best trial's full stage config, accepted unchanged by the stage's job),
``manifest.json`` (stage "tune", linking the best trial's HF export). Rerunning the same name restores
the study and does not rerun finished trials.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1ray.artifacts import join, now, write_bytes_atomic, write_manifest
from r1ray.config import R1Config, load_config, set_dotted, to_yaml
from r1ray.observe.log import get_logger
from r1ray.runtime import ray_session
from r1ray.train.registry import get_stage
from r1ray.tune.config import TuneConfig
from r1ray.tune.space import Domain, parse_space

log = get_logger(__name__)

_STARTS = "r1ray_trial_starts.jsonl"
_FINAL = "r1ray_trial_final.json"
_PBT_RESUMES = "r1ray_pbt_resumes.jsonl"


@dataclass(frozen=True)
class StudyResult:
    study_dir: str
    table_path: str
    best_config_path: str | None
    best_params: dict[str, Any] | None
    best_metric: float | None
    best_export: str | None
    default_metric: float | None
    num_trials: int
    num_errored: int


def _nested(values: dict[str, Any]) -> dict:
    out: dict = {}
    for k, v in values.items():
        set_dotted(out, k, v)
    return out


def _get_path(cfg: R1Config, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _stage_config(spec: dict[str, Any], params: dict[str, Any], extra: dict[str, Any]) -> R1Config:
    stage = get_stage(spec["stage"])
    argv = [a for f in spec["stage_config"] for a in ("--config", f)]
    return load_config(stage.config_class(), argv, base=spec["base"], values={**params, **extra})


def _trial(params: dict[str, Any], spec: dict[str, Any]) -> None:
    """One trial: build the stage config from the sampled params and train it (function trainable)."""
    from ray import tune

    from r1ray.observe.log import setup_logging

    setup_logging(spec["log_level"])
    # Tune starts trials in their own trial directory; relative paths in configs (storage.root,
    # data.path, YAML files) mean what they meant where the study was launched.
    os.chdir(spec["cwd"])
    # Trials start worker groups while other trials load the CPUs: give them longer than Train's 60 s.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    trial_dir = ctx.get_trial_dir()
    # A start marker per attempt: restore and retry behaviour is checked from these.
    with open(os.path.join(trial_dir, _STARTS), "a") as f:
        f.write(json.dumps({"trial_id": trial_id, "time": time.time(), "params": params}, default=str) + "\n")
    attempt = len(Path(trial_dir, _STARTS).read_text().splitlines())
    stage = get_stage(spec["stage"])
    run_fn = stage.run_function()
    run_name = f"{spec['name']}-{trial_id}"
    if spec["pbt_interval"]:
        # Each start (a retry, or an exploit that hands this trial another trial's checkpoint) trains its
        # segments under new run names: an old segment's run directory would be resumed by Ray Train.
        _pbt_segments(params, spec, run_fn, f"{run_name}-a{attempt}")
        return
    cfg = _stage_config(spec, params, {"run_name": run_name, **spec["storage"]})
    result = run_fn(cfg, callbacks=[_metric_report_callback(spec["metric"])])
    if getattr(result, "status", "completed") != "completed":
        raise RuntimeError(f"trial {trial_id}: training ended {result.status!r}, not completed")
    final = _final_metrics(result)
    # Also on disk: a report made after the forwarded ones may not reach the result table (seen on 2.60).
    with open(os.path.join(trial_dir, _FINAL), "w") as f:
        json.dump(final, f, default=str)
    tune.report(final)


def _metric_report_callback(metric: str) -> Any:
    """Tune's TuneReportCallback, forwarding only the reports that carry ``metric`` (the evaluations):
    Tune rejects results without the study's metric, and ASHA's rungs then count evaluations."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _EvalReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return _EvalReports()


def _final_metrics(result: Any) -> dict[str, Any]:
    """A finished run's numbers, in the keys the stage reports during training."""
    # "completed", not "done": Tune sets its own "done" on the last result of every trial, stopped or not.
    out: dict[str, Any] = {"completed": 1.0}
    for key in ("train_loss", "steps", "samples_consumed"):
        value = getattr(result, key, None)
        if value is not None:
            out[key] = value
    out.update({k: v for k, v in result.metrics.items() if v is not None})  # val_loss, accuracy, baselines
    if getattr(result, "export_path", None):
        out["export_path"] = str(result.export_path)
    return out


def _pbt_segments(params: dict[str, Any], spec: dict[str, Any], run_fn: Any, run_name: str) -> None:
    """Train in checkpointed segments so PBT can copy state between trials and perturb hyperparameters."""
    from ray import tune

    interval, total = spec["pbt_interval"], spec["max_steps"]
    resume_dir, start_step = None, 0
    ckpt = tune.get_checkpoint()
    workdir = tempfile.mkdtemp(prefix="r1ray-pbt-")  # segment checkpoints; Tune keeps its own copies
    try:
        if ckpt is not None:  # a retry, or an exploit of another trial's checkpoint
            resume_dir = os.path.join(workdir, "resume")
            shutil.copytree(ckpt.to_directory(), resume_dir)
            made = json.loads(Path(resume_dir, "r1ray_pbt.json").read_text())
            start_step = made["step"]
            log.info("PBT trial resumes at step %d with params %s from a checkpoint made with %s",
                     start_step, params, made["params"])
            with open(os.path.join(tune.get_context().get_trial_dir(), _PBT_RESUMES), "a") as f:
                f.write(json.dumps({"step": start_step, "params": params, "checkpoint_params": made["params"],
                                    "time": time.time()}, default=str) + "\n")
            if start_step >= total:  # exploited at the very end: this trial's result is now the copied state's
                tune.report(made["metrics"])
                return
        segment = 0
        while start_step < total:
            stop = min(start_step + interval, total)
            extra: dict[str, Any] = {"run_name": f"{run_name}-s{start_step}", "train.stop_after_steps": stop,
                                     **spec["storage"]}
            if resume_dir:
                extra["checkpoint.resume_from"] = resume_dir
            cfg = _stage_config(spec, params, extra)
            result = run_fn(cfg)
            if result.checkpoint is None:
                raise RuntimeError(f"PBT segment ending at step {stop} produced no checkpoint")
            out = os.path.join(workdir, f"seg{segment}")
            shutil.copytree(result.checkpoint, out)
            metrics = _final_metrics(result)
            metrics["step"] = stop
            if stop < total:
                metrics.pop("completed", None)
            Path(out, "r1ray_pbt.json").write_text(
                json.dumps({"step": stop, "params": params, "metrics": metrics}, default=str))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(out))
            if resume_dir:
                shutil.rmtree(resume_dir, ignore_errors=True)
            resume_dir, start_step, segment = out, stop, segment + 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _searcher(cfg: TuneConfig, points: list[dict[str, Any]], concurrent: int) -> Any:
    from ray.tune.search import ConcurrencyLimiter

    if cfg.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # say so, never fall back silently
            raise RuntimeError("search.algorithm=optuna needs optuna: pip install 'r1ray[tune]'") from e
        algo = OptunaSearch(points_to_evaluate=points or None, seed=cfg.seed)
        return ConcurrencyLimiter(algo, max_concurrent=concurrent)
    if cfg.search.algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: it must be given here.
        return BasicVariantGenerator(points_to_evaluate=points or None, random_state=cfg.seed,
                                     max_concurrent=concurrent)
    return None  # grid: Tune's default generator expands grid_search


def _scheduler(cfg: TuneConfig, domains: list[Domain], eval_reports: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = cfg.scheduler
    if s.name == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            # +1: the trial's closing report (export path, final losses) comes after its last evaluation.
            max_t=max(eval_reports, s.grace_period) + 1,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    if s.name == "pbt":
        mutations = {d.path: (list(d.args[0]) if d.kind in ("choice", "grid") else d.to_tune()) for d in domains}
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=1,  # every segment
            hyperparam_mutations=mutations,
            quantile_fraction=s.quantile_fraction,
            synch=s.synch,
        )
    return FIFOScheduler()


def _state_api_probe() -> None:
    """Runs as a task on the head node, as Train's PlacementGroupCleaner does: no address given."""
    from ray.util.state import list_actors

    list_actors(limit=1, timeout=10, raise_on_missing_output=False)


def _require_state_api() -> None:
    """Fail before any trial when Ray Train could not free a stopped trial's workers.

    Ray Train (2.60) creates each run's worker placement group from its controller actor, which a Tune trial
    owns. When ASHA/PBT stops a trial, or it crashes, the controller dies without removing that group, and
    only Train's PlacementGroupCleaner (a detached actor on the head node) frees it, after asking the State
    API whether the controller is alive. The State API needs the dashboard, and with no address given (the
    cleaner gives none) it also fails when several Ray instances run on the head machine. Either way the
    group keeps its CPUs forever and every later trial waits for workers, so check it the cleaner's way.
    """
    import ray
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    probe = ray.remote(num_cpus=0, max_retries=0)(_state_api_probe).options(
        resources={HEAD_NODE_RESOURCE_NAME: 0.001})
    deadline = time.monotonic() + 30  # a dashboard that was just started may need a few seconds
    while True:
        try:
            ray.get(probe.remote(), timeout=60)
            return
        except Exception as e:  # noqa: BLE001 - any failure means the same thing here
            error = getattr(e, "cause", None) or e
        if time.monotonic() > deadline or "multiple active Ray instances" in str(error):
            break
        time.sleep(1)
    raise RuntimeError(
        "tune needs Ray's State API on the head node: Ray Train frees the workers of a trial that the "
        "scheduler stops, or that crashes, only through it, and without it later trials never start. "
        "Start Ray with the dashboard (ray.include_dashboard=true, or `ray start --head` without "
        "--include-dashboard=false), and run one Ray instance per machine. "
        f"Cause: {str(error).strip().splitlines()[-1][:500]}"
    ) from error


def _max_concurrent(cfg: TuneConfig, base_cfg: R1Config) -> int:
    """``search.max_concurrent_trials``, or as many trials as the cluster's CPUs (and GPUs) fit, each with
    its largest worker group, one CPU kept for Ray Data and the trials' drivers."""
    import ray

    if cfg.search.max_concurrent_trials:
        return cfg.search.max_concurrent_trials
    sc = _get_path(base_cfg, "scaling")
    workers = sc.num_workers if isinstance(sc.num_workers, int) else max(sc.num_workers)
    beside = base_cfg.resources_beside_workers() if hasattr(base_cfg, "resources_beside_workers") else {}
    total = ray.cluster_resources()
    cpus = workers * sc.cpus_per_worker + beside.get("CPU", 0.0)
    fits = int(max(total.get("CPU", 1.0) - 1.0, 0.0) // max(cpus, 1e-9))
    gpus = (workers if sc.use_gpu else 0) + beside.get("GPU", 0.0)
    if gpus:
        fits = min(fits, int(total.get("GPU", 0.0) // gpus))
    n = max(1, fits)
    log.info("running up to %d trials at once (%s workers and %s beside them each; cluster %s)", n, workers,
             beside or "nothing", {k: total.get(k) for k in ("CPU", "GPU") if k in total})
    return n


def _default_point(base_cfg: R1Config, domains: list[Domain]) -> dict[str, Any]:
    """The stage's unsearched values for the searched paths: the baseline the study is compared with."""
    return {d.path: _get_path(base_cfg, d.path) for d in domains}


def run(cfg: TuneConfig, *, prepare_inputs: Callable[[str, Any], dict[str, Any]] | None = None) -> StudyResult:
    """Run (or resume) the study; write the trial table, the best config and the manifest.

    ``prepare_inputs(stage, base_cfg)`` (``r1ray.pipeline.upstream.inputs_for`` from ``jobs/tune.py``) fills
    the stage's unset inputs once, before any trial, as dotted overrides added to every trial's base (so
    concurrent trials never race to build them)."""
    from ray import tune

    stage = get_stage(cfg.stage)
    stage_cls = stage.config_class()
    stage_files = [str(Path(f).resolve()) for f in cfg.stage_config]
    base = _nested(cfg.base)
    domains = parse_space(cfg.space, stage_cls, base=base, base_files=stage_files)
    base_cfg = load_config(stage_cls, [a for f in stage_files for a in ("--config", f)], base=base)
    study_root = cfg.storage.uri("tune")
    study_dir = join(study_root, cfg.run_name)
    started = now()
    max_steps = int(_get_path(base_cfg, "train.max_steps"))
    eval_every = int(_get_path(base_cfg, "train.eval_every") or 0)
    eval_reports = max(1, math.ceil(max_steps / eval_every) if eval_every else 1)
    spec = {
        "stage": cfg.stage,
        "name": cfg.run_name,
        "stage_config": stage_files,
        "base": base,
        "metric": cfg.search.metric,
        "log_level": cfg.logging.level,
        "pbt_interval": cfg.scheduler.perturbation_interval if cfg.scheduler.name == "pbt" else 0,
        "max_steps": max_steps,
        "cwd": os.getcwd(),
        # Trials' runs live under the study's storage root unless ``base`` says otherwise.
        "storage": {} if "storage" in base and "root" in base["storage"] else {"storage.root": cfg.storage.uri()},
    }
    default_point = _default_point(base_cfg, domains)
    points = [default_point] if cfg.search.algorithm != "grid" else []

    with ray_session(cfg.ray):
        _require_state_api()
        concurrent = _max_concurrent(cfg, base_cfg)
        if prepare_inputs is not None:
            for key, value in prepare_inputs(cfg.stage, base_cfg).items():
                set_dotted(spec["base"], key, value)
        trainable = tune.with_resources(tune.with_parameters(_trial, spec=spec), {"cpu": cfg.trial_cpus})
        if tune.Tuner.can_restore(study_dir):
            log.info("restoring study %s: finished trials are kept, unfinished ones resume", study_dir)
            tuner = tune.Tuner.restore(study_dir, trainable, resume_unfinished=True, resume_errored=False)
        else:
            from ray.tune import FailureConfig, RunConfig

            tuner = tune.Tuner(
                trainable,
                param_space={d.path: d.to_tune() for d in domains},
                tune_config=tune.TuneConfig(
                    metric=cfg.search.metric,
                    mode=cfg.search.mode,
                    search_alg=_searcher(cfg, points, concurrent),
                    scheduler=_scheduler(cfg, domains, eval_reports),
                    num_samples=cfg.search.num_samples or (1 if cfg.search.algorithm == "grid" else 6),
                    max_concurrent_trials=concurrent,
                    reuse_actors=False,
                ),
                run_config=RunConfig(
                    name=cfg.run_name,
                    storage_path=study_root,
                    failure_config=FailureConfig(max_failures=cfg.trial_max_failures),
                    verbose=1,
                ),
            )
        grid = tuner.fit()
    return _summarise(cfg, grid, domains, default_point, base_cfg, study_dir, stage_files, started)


def _summarise(cfg: TuneConfig, grid: Any, domains: list[Domain], default_point: dict[str, Any],
               base_cfg: R1Config, study_dir: str, stage_files: list[str], started: str) -> StudyResult:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    metric, mode = cfg.search.metric, cfg.search.mode
    rows, best, default_metric = [], None, None
    for res in grid:
        params = {d.path: res.config.get(d.path) for d in domains}
        m = dict(res.metrics or {})
        final = Path(str(res.path), _FINAL) if res.path else None
        if final is not None and final.is_file():
            m.update(json.loads(final.read_text()))
        value = m.get(metric)
        row = {
            "trial_id": m.get("trial_id") or os.path.basename(str(res.path)),
            "status": "ERROR" if res.error else ("DONE" if m.get("completed") else "STOPPED"),
            **{f"config.{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()},
            metric: value,
            "iterations": m.get("training_iteration"),
            "steps": m.get("steps") or m.get("step"),
            "export_path": m.get("export_path"),
            "error": (str(res.error).splitlines()[0][:300] if res.error else None),
        }
        rows.append(row)
        if value is not None and not res.error and (
            best is None or (value < best[0] if mode == "min" else value > best[0])
        ):
            best = (value, params, m.get("export_path"))
        if params == default_point and value is not None:
            default_metric = value
    table_path = join(study_dir, "trials.parquet")
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, table_path)
    pacsv.write_csv(table, join(study_dir, "trials.csv"))
    best_config_path = None
    if best is not None:
        stage_cls = get_stage(cfg.stage).config_class()
        argv = [a for f in stage_files for a in ("--config", f)]
        best_cfg = load_config(stage_cls, argv, base=_nested(cfg.base),
                               values={**best[1], "run_name": f"{cfg.run_name}-best"})
        best_config_path = join(study_dir, "best.yaml")
        write_bytes_atomic(best_config_path, to_yaml(best_cfg).encode())
    errored = sum(1 for r in rows if r["status"] == "ERROR")
    write_manifest(
        study_dir,
        stage="tune",
        config=cfg,
        counts={"trials": len(rows), "errored": errored, "stopped": sum(r["status"] == "STOPPED" for r in rows)},
        started_at=started,
        metric=metric,
        mode=mode,
        best={"params": best[1], metric: best[0], "export_path": best[2]} if best else None,
        default={"params": default_point, metric: default_metric},
        best_config="best.yaml" if best_config_path else None,
        table="trials.parquet",
    )
    return StudyResult(
        study_dir=study_dir, table_path=table_path, best_config_path=best_config_path,
        best_params=best[1] if best else None, best_metric=best[0] if best else None,
        best_export=best[2] if best else None, default_metric=default_metric,
        num_trials=len(rows), num_errored=errored,
    )


def summary(result: StudyResult, cfg: TuneConfig) -> str:
    """Human summary the job prints."""
    lines = [f"study: {result.study_dir} ({result.num_trials} trials, {result.num_errored} failed)"]
    if result.best_params is None:
        lines.append("no trial reported a value for " + cfg.search.metric)
        return "\n".join(lines)
    lines.append(f"best {cfg.search.metric}: {result.best_metric:.4f} with {result.best_params}")
    if result.default_metric is not None:
        delta = result.default_metric - result.best_metric
        lines.append(f"default config's {cfg.search.metric}: {result.default_metric:.4f} (best is {delta:+.4f} better)")
    lines.append(f"best config: {result.best_config_path}")
    lines.append(f"  train it again: python jobs/{cfg.stage}.py --config {result.best_config_path}")
    if result.best_export:
        lines.append(f"best trial's export: {result.best_export}")
    lines.append(f"all trials: {result.table_path}")
    return "\n".join(lines)
