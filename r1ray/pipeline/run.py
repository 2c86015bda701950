"""One config from corpus to served reasoning model: run the stages in order, each on the artifact of the one
before, skipping those whose artifact is already there for the same resolved config and the same inputs.

    python jobs/pipeline.py                                   # the embedded default (configs/pipeline/default.yaml)
    python jobs/pipeline.py --config configs/pipeline/debug.yaml --from sft --until evaluate

Caching. A stage's key is the SHA-256 of its resolved config (inputs wired in; ``ray`` and ``logging`` left
out, they do not change results) and of the manifest hashes of its input artifacts. The pipeline's state
(``<storage.root>/pipeline/<run_name>/state.json``) records each stage's key, artifact and artifact manifest hash;
a stage is skipped when its key is unchanged and its artifact is still the one recorded. Changing one stage's
config changes its key, and its new artifact changes the keys of every stage after it, so exactly those rerun.
A training stage that reruns for a new key starts from an empty run directory (a stale checkpoint of another
config is never resumed); one that failed reruns with the same key and resumes from its newest checkpoint.

Failures. Each stage logs to ``<storage.root>/pipeline/<run_name>/logs/<stage>.log``; a failing stage is named
with that path, the state says ``failed``, and rerunning the pipeline resumes there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1ray.artifacts import canonical_json, is_complete, manifest_sha256, sha256_bytes, write_bytes_atomic
from r1ray.config import dotted_values, load_config
from r1ray.observe.log import get_logger
from r1ray.pipeline.config import PipelineConfig
from r1ray.train.registry import STAGES as TRAIN_REGISTRY

log = get_logger(__name__)

__all__ = ["PipelineFailed", "PipelineResult", "StageOutcome", "resolve_stage", "run", "serve_forever", "stage_key",
           "summary"]

TRAIN_STAGES = tuple(TRAIN_REGISTRY)


class PipelineFailed(RuntimeError):
    """A stage failed (or its gate refused); the message names the stage, the cause and the log."""


@dataclass
class StageOutcome:
    stage: str
    status: str
    """ran, skipped, refused (the compression gate refused; ``PipelineConfig.on_compress_refused``), served"""
    artifact: str | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    """What the report card shows: final metrics, report series, tables."""
    log_path: str | None = None


@dataclass
class PipelineResult:
    name: str
    root: str
    outcomes: list[StageOutcome]
    model: str | None
    """The final model export (what is served)."""
    lineage: list[dict[str, Any]]
    report: str | None
    serve_url: str | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Stage adapters: config class, input wiring, execution
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Adapter:
    config: str
    """``module:Class`` of the stage's config."""
    wire: Callable[[PipelineConfig, dict[str, str], Any], dict[str, Any]]
    """Dotted overrides that connect the stage to the upstream artifacts: ``wire(pipeline_config, upstream,
    unwired)``, ``unwired`` being the stage's config before the wiring (training stages; None for the others)."""
    execute: Callable[[Any], tuple[str | None, dict[str, Any]]]
    """Run the stage: (artifact, summary)."""
    inputs: tuple[str, ...]
    """Which upstream artifacts it consumes ("data", "model")."""


def _import(ref: str) -> Any:
    import importlib

    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _train(stage: str) -> Callable[[Any], tuple[str | None, dict[str, Any]]]:
    def execute(cfg: Any) -> tuple[str | None, dict[str, Any]]:
        result = TRAIN_REGISTRY[stage].run_function()(cfg)
        if result.status != "completed" or not result.export_path:
            raise PipelineFailed(f"training ended {result.status!r} without an export ({result.run_dir}); rerun the "
                                 "pipeline to resume it")
        return result.export_path, {
            "metrics": dict(result.metrics), "train_loss": result.train_loss, "steps": result.steps,
            "reports": result.worker_result.get("reports", []), "run_dir": result.run_dir,
        }
    return execute


def _data(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    from r1ray.artifacts import read_manifest
    from r1ray.data.pipeline import run

    uri = run(cfg)
    return uri, {"counts": read_manifest(uri).get("counts", {})}


def _traces(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    from r1ray.artifacts import read_manifest
    from r1ray.train.stages.traces import generate

    uri = generate(cfg)
    return uri, {"counts": read_manifest(uri).get("counts", {})}


def _evaluate(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    from r1ray.eval.run import run

    result = run(cfg)
    return result.artifact, {"table": result.summary, "rows": result.rows}


def _compress(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    from r1ray.compress.run import run

    result = run(cfg)
    report = Path(result.report_dir) / "report.md"
    info: dict[str, Any] = {"table": report.read_text() if report.exists() else "", "report": str(report)}
    if not result.passed:  # nothing published; ``_run_stage`` applies the pipeline's on_compress_refused
        return None, {**info, "refused": list(result.reasons)}
    return result.export_path, info


def _serve(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    from r1ray.serve.launch import run

    info = run(cfg)
    return None, {"url": info.url, "model_name": info.model_name, "curl": info.curl}


def _train_adapter(name: str) -> _Adapter:
    """A training stage as the registry declares it: its optional inputs (SFT's corpus replay) are wired when its
    config wants them, so its wiring reads the stage's unwired config."""
    entry = TRAIN_REGISTRY[name]
    return _Adapter(entry.config, lambda p, up, cfg: entry.wire(up, cfg), _train(name), entry.required)


ADAPTERS: dict[str, _Adapter] = {
    "data": _Adapter("r1ray.data.config:PrepareDataConfig", lambda p, up, cfg: {}, _data, ()),
    **{name: _train_adapter(name) for name in TRAIN_REGISTRY},
    # not a stage of its own in ``stages``: run before a sequence-mode distillation, with its own key, state
    # entry, log and artifact
    "traces": _Adapter("r1ray.train.stages.traces:TracesConfig", lambda p, up, cfg: {}, _traces, ("model",)),
    "evaluate": _Adapter("r1ray.eval.config:EvaluateConfig",
                         lambda p, up, cfg: {"model": {"path": up["model"], "name": p.run_name},
                                             **({"perplexity.data": up["data"]} if "data" in up else {})},
                         _evaluate, ("model",)),
    "compress": _Adapter("r1ray.compress.config:CompressConfig",
                         lambda p, up, cfg: {"model": up["model"],
                                             **({"eval.perplexity.data": up["data"]} if "data" in up else {})},
                         _compress, ("model",)),
    "serve": _Adapter("r1ray.serve.config:ServeConfig",
                      lambda p, up, cfg: {"model_path": up["model"], "model_name": f"r1ray-{p.run_name}"}, _serve,
                      ("model",)),
}


# --------------------------------------------------------------------------------------------------
# Resolving and keys
# --------------------------------------------------------------------------------------------------


def _wants_traces(p: PipelineConfig, upstream: dict[str, str]) -> bool:
    return resolve_stage(p, "distill", upstream).distill.mode == "sequence"


def resolve_stage(p: PipelineConfig, stage: str, upstream: dict[str, str]) -> Any:
    """The stage's config: its YAML files and overrides, the pipeline's shared blocks, its wired inputs. The
    ``traces`` step (sequence-mode distillation) is derived from the distillation stage's config."""
    if stage == "traces":
        from r1ray.train.stages.distill import traces_config

        return traces_config(resolve_stage(p, "distill", {k: v for k, v in upstream.items() if k != "traces"}))
    adapter = ADAPTERS[stage]
    cls = _import(adapter.config)
    spec = p.spec(stage)
    missing = [i for i in adapter.inputs if i not in upstream]
    if missing:
        raise PipelineFailed(f"stage {stage} needs the {' and '.join(missing)} of an earlier stage, and none of "
                             f"the stages before it produced one (stages: {p.stages})")
    shared: dict[str, Any] = {"seed": p.seed, "ray": p.ray.model_dump(mode="json"),
                              "storage": p.storage.model_dump(mode="json"),
                              "logging": p.logging.model_dump(mode="json")}
    shared["run_name"] = f"{p.run_name}-{stage}"
    # the pipeline's shared blocks and run names win over the stage's files; the stage's overrides come
    # next; the wiring to the upstream artifacts is last (never set by hand)
    values = {**{k: v for k, v in shared.items() if k in cls.model_fields}, **dotted_values(cls, dict(spec.overrides))}
    argv = [a for f in spec.config for a in ("--config", f)]
    try:
        unwired = load_config(cls, argv, values=values) if stage in TRAIN_STAGES else None
        return load_config(cls, argv, values={**values, **adapter.wire(p, upstream, unwired)})
    except Exception as e:  # noqa: BLE001 - name the stage with the config error
        raise PipelineFailed(f"the {stage} stage's config is invalid: {e}") from e


def check_stage_configs(p: PipelineConfig) -> list[str]:
    """Every stage's files and overrides validated by its config class before any stage runs (inputs are
    wired later); one line per problem, naming the stage."""
    from r1ray.config import ConfigError

    problems = []
    for stage in p.stages:
        spec = p.spec(stage)
        cls = _import(ADAPTERS[stage].config)
        try:
            load_config(cls, [a for f in spec.config for a in ("--config", f)],
                        values=dotted_values(cls, dict(spec.overrides)))
        except ConfigError as e:
            problems.extend(f"{stage}: {line}" for line in e.problems)
    return problems


def stage_key(stage: str, cfg: Any, upstream: dict[str, str], inputs: tuple[str, ...]) -> str:
    """SHA-256 of the resolved config (without ray/logging) and of the input artifacts' manifests."""
    data = cfg.model_dump(mode="json")
    for k in ("ray", "logging"):
        data.pop(k, None)
    hashes = {i: manifest_sha256(upstream[i]) for i in inputs}
    return sha256_bytes(canonical_json({"stage": stage, "config": data, "inputs": hashes}))


# --------------------------------------------------------------------------------------------------
# State and logs
# --------------------------------------------------------------------------------------------------


class _State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, stage: str) -> dict[str, Any]:
        return self.data.get(stage, {})

    def put(self, stage: str, **entry: Any) -> None:
        self.data[stage] = {**self.data.get(stage, {}), **entry}
        write_bytes_atomic(str(self.path), canonical_json(self.data))


class _StageLog:
    """r1ray's log lines of one stage also go to ``logs/<stage>.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _StageLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, mode="a")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("r1ray").addHandler(self.handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("r1ray").removeHandler(self.handler)
        self.handler.close()


def _artifact_ok(entry: dict[str, Any]) -> bool:
    uri = entry.get("artifact")
    if not uri or not is_complete(uri):
        return False
    try:
        return manifest_sha256(uri) == entry.get("manifest_sha256")
    except Exception:  # noqa: BLE001 - unreadable: not reusable
        return False


def _fresh_run_dir(cfg: Any) -> None:
    """A training stage rerun for a new key must not resume the old config's checkpoints."""
    run_dir = Path(cfg.storage.uri("runs", cfg.run_name))
    if run_dir.exists():
        log.info("the %s config changed: clearing %s", cfg.run_name, run_dir)
        shutil.rmtree(run_dir)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(p: PipelineConfig, *, on_served: Callable[[PipelineResult], None] | None = None) -> PipelineResult:
    """Run the pipeline (see the module doc); raises PipelineFailed naming the stage and its log.

    ``on_served(result)`` is called while the final model is being served, inside the pipeline's Ray session
    (``jobs/pipeline.py`` prints the summary there and keeps serving until Ctrl-C)."""
    from r1ray.artifacts import lineage
    from r1ray.runtime import ray_session

    t0 = time.perf_counter()
    problems = check_stage_configs(p)
    if problems:
        raise PipelineFailed("invalid stage config(s), nothing was run:\n  - " + "\n  - ".join(problems))
    root = Path(p.storage.uri("pipeline", p.run_name))
    root.mkdir(parents=True, exist_ok=True)
    state = _State(root / "state.json")
    upstream: dict[str, str] = {}
    outcomes: list[StageOutcome] = []
    start = p.stages.index(p.from_stage) if p.from_stage else 0
    end = p.stages.index(p.until_stage) + 1 if p.until_stage else len(p.stages)
    serve_url = None
    with ray_session(p.ray):
        for i, stage in enumerate(p.stages[:end]):
            if stage == "distill" and _wants_traces(p, upstream):  # sequence mode: the teacher's traces first
                traces = _run_stage(p, "traces", upstream, state, root, reuse_only=i < start)
                outcomes.append(traces)
                upstream["traces"] = str(traces.artifact)
            outcome = _run_stage(p, stage, upstream, state, root, reuse_only=i < start)
            outcomes.append(outcome)
            if outcome.stage == "serve":
                serve_url = outcome.summary.get("url")
            elif outcome.artifact:
                if stage == "data":
                    upstream["data"] = outcome.artifact
                elif stage != "evaluate":
                    upstream["model"] = outcome.artifact
        model = upstream.get("model")
        chain = lineage(model) if model else []
        if "data" in upstream:
            _corpus_perplexity(outcomes, upstream["data"])
        report = None
        if p.report:
            from r1ray.pipeline.report import write_report

            report = write_report(root, p, outcomes, chain)
        result = PipelineResult(p.run_name, str(root), outcomes, model, chain, report, serve_url,
                                time.perf_counter() - t0)
        if serve_url and on_served is not None:
            on_served(result)  # the job prints the summary and keeps serving inside this Ray session
    return result


def _corpus_perplexity(outcomes: list[StageOutcome], data: str) -> None:
    """Held-out corpus perplexity of every training stage's export (``summary["corpus_perplexity"]``): forgetting,
    stage by stage, on the validation split of the corpus the chain was pretrained on."""
    from r1ray.eval.corpus import corpus_perplexity

    for o in outcomes:
        if o.stage in TRAIN_STAGES and o.artifact and "corpus_perplexity" not in o.summary:
            try:
                o.summary["corpus_perplexity"] = corpus_perplexity(o.artifact, data)
            except ValueError as e:  # another tokenizer (a student from elsewhere): nothing comparable to score
                log.info("corpus perplexity of the %s export skipped: %s", o.stage, e)


def _run_stage(p: PipelineConfig, stage: str, upstream: dict[str, str], state: _State, root: Path, *,
               reuse_only: bool) -> StageOutcome:
    adapter = ADAPTERS[stage]
    log_path = root / "logs" / f"{stage}.log"
    cfg = resolve_stage(p, stage, upstream)
    if stage == "serve":
        cfg = cfg.model_copy(update={"blocking": False})  # the pipeline keeps serving itself, after the report
    inputs = tuple(i.kind for i in TRAIN_REGISTRY[stage].wired(upstream, cfg)) if stage in TRAIN_REGISTRY \
        else adapter.inputs
    key = stage_key(stage, cfg, upstream, inputs)
    entry = state.get(stage)
    if entry.get("key") == key and entry.get("status") == "refused":  # the gate's verdict on the same input
        log.info("pipeline %s: %s unchanged, reusing its refusal", p.run_name, stage)
        return _refused(p, stage, entry.get("summary", {}), 0.0, log_path, "skipped")
    if stage != "serve" and entry.get("key") == key and entry.get("status") == "done" and _artifact_ok(entry):
        log.info("pipeline %s: %s unchanged, reusing %s", p.run_name, stage, entry["artifact"])
        return StageOutcome(stage, "skipped", entry["artifact"], 0.0, entry.get("summary", {}), str(log_path))
    if reuse_only:
        raise PipelineFailed(f"--from {p.from_stage}: stage {stage} has no reusable artifact for its current config "
                             f"(state: {entry.get('status', 'never run')}); run the pipeline from {stage} or earlier")
    if stage in TRAIN_STAGES and entry.get("key") != key:
        _fresh_run_dir(cfg)
    state.put(stage, key=key, status="running", log=str(log_path))
    log.info("pipeline %s: running %s (log: %s)", p.run_name, stage, log_path)
    t0 = time.perf_counter()
    with _StageLog(log_path):
        try:
            artifact, info = adapter.execute(cfg)
        except BaseException as e:
            with open(log_path, "a") as f:
                f.write(traceback.format_exc())
            state.put(stage, status="failed", error=str(e)[-2000:])
            if isinstance(e, KeyboardInterrupt):
                raise
            raise PipelineFailed(f"stage {stage} failed: {str(e)[-1500:]}\n  log: {log_path}\n  rerun the pipeline "
                                 f"to resume at {stage}") from e
    seconds = time.perf_counter() - t0
    info["seconds"] = seconds
    if info.get("refused"):
        state.put(stage, status="refused", artifact=None, manifest_sha256=None, seconds=seconds,
                  summary=_jsonable(info))
        return _refused(p, stage, info, seconds, log_path, "ran")
    sha = manifest_sha256(artifact) if artifact else None
    state.put(stage, status="done", artifact=artifact, manifest_sha256=sha, seconds=seconds,
              summary=_jsonable(info))
    log.info("pipeline %s: %s done in %.0fs -> %s", p.run_name, stage, seconds, artifact)
    return StageOutcome(stage, "served" if stage == "serve" else "ran", artifact, seconds, info, str(log_path))


def _refused(p: PipelineConfig, stage: str, info: dict[str, Any], seconds: float, log_path: Path,
             how: str) -> StageOutcome:
    """The compression gate refused (``how``: it ran now, or its verdict was reused): stop, or go on with the
    uncompressed model, loudly (``PipelineConfig.on_compress_refused``)."""
    why = ("the compression gate refused the compressed model (nothing published): "
           + "; ".join(info.get("refused", [])) + f"\n  report: {info.get('report')}")
    if p.on_compress_refused == "stop":
        raise PipelineFailed(f"stage {stage}: {why}\n  on_compress_refused=stop; "
                             "on_compress_refused=serve_uncompressed goes on with the uncompressed model")
    log.error("pipeline %s: %s\n  on_compress_refused=serve_uncompressed: the stages after it get the uncompressed "
              "model", p.run_name, why)
    return StageOutcome(stage, "refused", None, seconds, {**info, "reused": how == "skipped"}, str(log_path))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def serve_forever(p: PipelineConfig) -> None:
    """Keep serving until Ctrl-C, unless the pipeline's serve stage says ``blocking: false``."""
    spec = p.spec("serve").overrides
    if not spec.get("blocking", True):
        return
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the shutdown short
        log.info("pipeline %s: stopping the server", p.run_name)


def summary(result: PipelineResult) -> str:
    """Per-stage timing and status, the lineage of the final model, the evaluation table, the report."""
    lines = [f"pipeline {result.name}: {len(result.outcomes)} stage(s) in {result.seconds:.0f}s"]
    for o in result.outcomes:
        lines.append(f"  {o.stage:<9} {o.status:<8} {o.seconds:7.0f}s  {o.artifact or ''}")
    if result.lineage:
        lines.append("lineage of the final model (newest first):")
        for entry in result.lineage:
            lines.append(f"  {entry.get('stage') or '?':<9} {entry['uri']}  sha256 {str(entry.get('manifest_sha256'))[:12]}"
                         + ("" if entry.get("status") == "ok" else f"  [{entry.get('status')}]"))
    for o in result.outcomes:
        if o.status == "refused":
            lines.append(f"{o.stage}: REFUSED by the quality gate, nothing published; the uncompressed model went on:")
            lines.extend(f"  - {r}" for r in o.summary.get("refused", []))
            lines.append(f"  report: {o.summary.get('report')}")
    for o in result.outcomes:
        if o.stage == "evaluate" and o.summary.get("table"):
            lines.append("evaluation:")
            lines.extend("  " + line for line in str(o.summary["table"]).splitlines())
    if result.report:
        lines.append(f"report card: {result.report}")
    if result.serve_url:
        serve = next(o for o in result.outcomes if o.stage == "serve")
        lines.append(f"serving {serve.summary.get('model_name')} at {result.serve_url}/v1 (Ctrl-C to stop)")
    return "\n".join(lines)

