"""The one driver of every training job: plan -> resources -> fit -> publish -> result.

``run_stage(StageClass, cfg)`` is what ``r1ray.train.stages.pretrain.run``, ``sft.run``, ``grpo.run`` and
``distill.run`` are: the stage checks and resolves its inputs (``Stage.plan``, before any worker starts),
starts what its workers need for the whole fit (``Stage.resources``, e.g. a rollout engine pool), Ray Train
fits the shared loop, the newest checkpoint's HF export is published as ``<run_dir>/final`` (an artifact whose
manifest names the inputs), and a typed ``TrainResult`` comes back. ``summary(result)`` is the job's closing
text. A missing upstream artifact is never prepared here (that is ``r1ray.pipeline``'s job): a stage whose
input is unset fails in ``plan`` naming the field.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["TrainResult", "run_stage", "summary"]


@dataclass
class TrainResult:
    """What a training run produced (every stage returns one; Tune reads its ``metrics``)."""

    stage: str
    run_dir: str
    export_path: str | None
    """``<run_dir>/final``: the HF model directory to evaluate or serve (None if the run stopped early)."""
    checkpoint: str | None
    """Newest checkpoint directory (DeepSpeed + trainer state + HF export)."""
    status: str
    """completed; preempted (SIGTERM/preemption: rerun the same run_name to continue); or stopped (at
    ``train.stop_after_steps``, a resumable segment)."""
    steps: int
    samples_consumed: int
    train_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    """The final evaluation (``val_loss``, accuracy, ...) and the driver's baselines."""
    inputs: list[str] = field(default_factory=list)
    restarts: int = 0
    nonfinite_steps: int = 0
    world_size: int = 0
    seconds: float = 0.0
    worker_result: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def val_loss(self) -> float | None:
        return self.metrics.get("val_loss")

    @property
    def val_perplexity(self) -> float | None:
        v = self.val_loss
        return math.exp(min(v, 50.0)) if v is not None else None

    @property
    def unigram_val_loss(self) -> float | None:
        return self.metrics.get("unigram_val_loss")

    @property
    def data(self) -> str | None:
        return self.inputs[0] if self.inputs else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("worker_result")
        d["val_loss"] = self.val_loss
        return d


def run_stage(
    stage_cls: type,
    cfg: Any,
    *,
    callbacks: Sequence[Any] = (),
    run_name: str | None = None,
    storage_path: str | None = None,
) -> TrainResult:
    """Train ``cfg`` with ``stage_cls`` to the end (or to a preemption) and return what it produced.

    ``callbacks`` are extra Ray Train callbacks (e.g. Tune's report callback); ``run_name`` and
    ``storage_path`` override the run's name and storage (default ``cfg.run_name`` and
    ``<storage.root>/runs``), so the run directory is ``<storage_path>/<run_name>``.
    """
    from r1ray.artifacts import join
    from r1ray.runtime import ray_session
    from r1ray.train.core.checkpoint import HF_DIR, publish_final
    from r1ray.train.core.launch import fit
    from r1ray.train.core.preflight import preflight, raise_on_problems

    t0 = time.perf_counter()
    stage_ref = f"{stage_cls.__module__}:{stage_cls.__qualname__}"
    # deterministic setup problems (an optimizer op that cannot be built here, an unparsable
    # TORCH_CUDA_ARCH_LIST) fail now, naming the cause, instead of being retried by Ray Train
    raise_on_problems(preflight(cfg.deepspeed, cfg.optim, use_gpu=cfg.scaling.use_gpu))
    from r1ray.train.stage import Stage

    if stage_cls.make_batch is Stage.make_batch and stage_cls.step_inputs is Stage.step_inputs:
        raise TypeError(f"{stage_cls.__name__} implements neither make_batch nor step_inputs: the loop has no way "
                        "to build its batches")
    if cfg.train.curriculum_epochs and stage_cls.sample_difficulty is Stage.sample_difficulty:
        raise ValueError(f"train.curriculum_epochs={cfg.train.curriculum_epochs}: the {stage_cls.name} stage has no "
                         "difficulty score per sample; set it to 0 (SFT and GRPO order task difficulty with their "
                         "curriculum block)")
    with ray_session(cfg.ray):
        plan = stage_cls.plan(cfg)
        name = run_name or cfg.run_name
        storage = storage_path or cfg.storage.uri("runs")
        run_dir = join(storage, name)
        with stage_cls.resources(plan.config, run_dir) as resources:
            out = fit(stage_ref, plan.config, name=name, storage_path=storage, callbacks=callbacks,
                      resources=resources)

    metrics = {k: v for k, v in (out.get("metrics") or {}).items() if isinstance(v, (int, float))}
    metrics.update(plan.baselines)
    export = None
    if out["status"] == "completed" and out.get("checkpoint") and cfg.checkpoint.export_hf:
        export = publish_final(
            run_dir, join(out["checkpoint"], HF_DIR), stage=stage_cls.name, config=plan.config,
            inputs=plan.inputs, counts={"steps": out["step"], "samples_consumed": out["samples_consumed"]},
            metrics={"train_loss": out.get("train_loss"), **metrics},
        )
    result = TrainResult(
        stage=stage_cls.name, run_dir=run_dir, export_path=export, checkpoint=out.get("checkpoint"),
        status=out["status"], steps=out["step"], samples_consumed=out["samples_consumed"],
        train_loss=out.get("train_loss"), metrics=metrics, inputs=list(plan.inputs),
        restarts=out.get("restarts", 0), nonfinite_steps=out.get("nonfinite_total", 0),
        world_size=out.get("world_size", 0), seconds=time.perf_counter() - t0, worker_result=out,
    )
    log.info("%s %s: %s after %d steps (%d samples); train loss %s, val loss %s; export %s", stage_cls.name,
             name, result.status, result.steps, result.samples_consumed, _fmt(result.train_loss),
             _fmt(result.val_loss), export)
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary(result: TrainResult, extra: Sequence[str] = ()) -> str:
    """The closing lines of a training job: losses, metrics, where the model went, what to run next."""
    lines = [
        f"{result.stage} {result.status}: {result.steps} steps, {result.samples_consumed} samples, "
        f"{result.world_size} worker(s), {result.seconds:.0f}s, {result.restarts} restart(s)",
        f"  train loss       {_fmt(result.train_loss)}",
    ]
    if result.val_loss is not None:
        lines.append(f"  validation loss  {_fmt(result.val_loss)} (perplexity {_fmt(result.val_perplexity)})")
    if result.unigram_val_loss is not None:
        lines.append(f"  unigram baseline {_fmt(result.unigram_val_loss)} (validation cross-entropy of token "
                     "frequencies)")
    for key, value in sorted(result.metrics.items()):
        if key not in ("val_loss", "val_perplexity", "unigram_val_loss"):
            lines.append(f"  {key:<16} {_fmt(value)}")
    lines.extend(extra)
    lines.append(f"  run directory    {result.run_dir}")
    if result.export_path:
        lines.append(f"  HF export        {result.export_path}")
        lines.append(f"next: python jobs/serve.py model_path={result.export_path}")
    elif result.status in ("preempted", "stopped"):
        lines.append("next: rerun the same command (same run_name) to continue from the newest checkpoint")
    return "\n".join(lines)
