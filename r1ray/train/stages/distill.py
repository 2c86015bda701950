"""Distillation: a small student learns from a frozen teacher, through the shared training loop.

Two modes (``distill.mode``):

- ``logit``: the student matches the teacher's next-token distributions on the assistant tokens of the SFT
  data (task traces or a jsonl of conversations), with a divergence (``forward_kl`` = KL(teacher || student),
  the classic Hinton loss; ``reverse_kl`` = KL(student || teacher), mode-seeking, as in MiniLLM; ``jsd`` with
  weight ``jsd_beta``, as in GKD), softened by ``temperature`` (scaled by T^2 so gradients keep their size),
  optionally mixed with the data's cross-entropy (``ce_weight``). The teacher is the stage's frozen model
  (``Stage.frozen_models``: on the device in the training precision, partitioned under ZeRO-3). Teacher and
  student must share a tokenizer: a mismatch fails in ``plan``, naming both.
- ``sequence``: the teacher generates reasoning traces for task prompts (an engine pool, ``r1ray.infer.pool``,
  driven by Ray Data), optionally keeping only the traces its verifier accepts (``keep_correct``, i.e.
  rejection sampling), writes them as a jsonl of conversations into the run directory, and the student is
  fine-tuned on them with SFT's loss: sequence-level KD (Kim & Rush), what DeepSeek-R1 did for its
  distilled models.

The student is ``model.init_from`` (a smaller pretrained model) or, when unset, a fresh ``model.preset`` (the
``*-student`` presets are a quarter of their teacher's parameters or less) with the teacher's tokenizer.
``DistillStage`` extends ``SFTStage``: the same data, masks, evaluation (``val_loss``, greedy ``accuracy``) and
exactly-once cursor; validation also reports ``val_teacher_kl`` (KL(teacher || student) at temperature 1 on
held-out assistant tokens) and ``val_kd_loss``.

    python jobs/distill.py                                    # student of the default SFT export
    python jobs/distill.py distill.teacher=outputs/runs/sft/final distill.mode=sequence
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from r1ray.config import R1Config
from r1ray.model.build import ModelConfig
from r1ray.observe.log import get_logger
from r1ray.train.core.driver import TrainResult, run_stage, summary  # noqa: F401 - summary: the job's closing text
from r1ray.train.core.inputs import lineage_inputs, start_problems
from r1ray.train.stage import Metrics, RunPlan, WorkerInfo
from r1ray.train.stages.sft import (
    SFTConfig,
    SFTDataConfig,
    SFTStage,
    accuracy_before,
    accuracy_table,
    plan_problems,
)

log = get_logger(__name__)

__all__ = ["DistillConfig", "DistillSection", "DistillStage", "divergence", "run"]


class DistillSection(R1Config):
    """The teacher and how the student learns from it."""

    teacher: str | None = None
    """The teacher: a Hugging Face model directory or an r1ray export. Unset: ``python jobs/distill.py`` fills
    it with the default SFT export (trained first when missing)."""
    mode: Literal["logit", "sequence"] = "logit"
    """``logit``: match the teacher's token distributions; ``sequence``: fine-tune on teacher-generated traces."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """Logit mode: KL(teacher || student), KL(student || teacher), or the generalised JSD with ``jsd_beta``."""
    temperature: float = Field(default=2.0, gt=0)
    """Logit mode: softmax temperature of both distributions (the loss is scaled by its square)."""
    jsd_beta: float = Field(default=0.5, gt=0, lt=1)
    """``jsd``: mixture weight of the teacher, m = beta * teacher + (1 - beta) * student."""
    ce_weight: float = Field(default=0.0, ge=0)
    """Logit mode: weight of the data's cross-entropy added to the divergence (0: pure distillation)."""
    traces: int = Field(default=2000, ge=1)
    """Sequence mode: task prompts the teacher answers (the student's training conversations)."""
    keep_correct: bool = True
    """Sequence mode: keep only traces whose answer the task's verifier accepts (rejection sampling)."""
    teacher_temperature: float = Field(default=0.0, ge=0)
    """Sequence mode: sampling temperature of the teacher (0: greedy)."""
    max_new_tokens: int = Field(default=160, ge=1)
    """Sequence mode: longest trace generated."""
    num_engines: int = Field(default=1, ge=1)
    """Sequence mode: teacher engine actors generating the traces."""
    cpus_per_engine: float = Field(default=1.0, gt=0)
    """Sequence mode: CPUs each teacher engine reserves."""


class DistillConfig(SFTConfig):
    """Distil a frozen teacher into a smaller student (logit or sequence-level KD) with Ray Train + DeepSpeed."""

    run_name: str = "distill"
    """Run directory ``<storage.root>/runs/<run_name>`` (distillation's default run is ``distill``)."""
    model: ModelConfig = ModelConfig(preset="mini-student")
    """The student: ``init_from`` a smaller model, or a fresh ``preset`` with the teacher's tokenizer (default:
    ``mini-student``, 22% of the default ``mini`` teacher's parameters at the default 2k vocabulary)."""
    distill: DistillSection = DistillSection()
    """Teacher and objective."""
    data: SFTDataConfig = SFTDataConfig()
    """The student's data (logit mode: the conversations the teacher's distributions are matched on; sequence mode:
    the task prompts the teacher answers). No corpus replay by default: the student is built fresh."""



def divergence(student_logits: Any, teacher_logits: Any, kind: str, temperature: float = 1.0,
               beta: float = 0.5) -> Any:
    """Per-token divergence [N] between two logits tensors [N, V] (fp32), softened by ``temperature``."""
    import torch

    s = torch.log_softmax(student_logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits.float() / temperature, -1)
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t + torch.log(torch.tensor(beta)),
                                         s + torch.log(torch.tensor(1 - beta))]), 0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose forward_kl, reverse_kl or jsd")


def tokenizer_problems(teacher: str, student_tokenizer_dir: str | None) -> list[str]:
    """Why the teacher's and the student's tokenizers differ (logit distillation compares token ids)."""
    from r1ray.model.tokenizer import load_tokenizer

    if student_tokenizer_dir is None:
        return []
    a, b = load_tokenizer(teacher), load_tokenizer(student_tokenizer_dir)
    if a.get_vocab() != b.get_vocab():
        return [f"distill.teacher ({teacher}, {len(a)} tokens) and model.init_from ({student_tokenizer_dir}, "
                f"{len(b)} tokens) use different tokenizers; logit distillation compares distributions over the "
                "same token ids: use a student with the teacher's tokenizer (or unset model.init_from to build "
                "one from model.preset), or distill.mode=sequence"]
    return []


class DistillStage(SFTStage):
    """SFT's data and evaluation; the loss matches a frozen teacher (logit mode) or is SFT's own on teacher
    traces (sequence mode)."""

    name = "distill"
    config_class = DistillConfig

    # ---- driver side
    @classmethod
    def plan(cls, cfg: DistillConfig) -> RunPlan:

        d = cfg.distill
        problems = start_problems(d.teacher, "distill.teacher",
                                  unset="set it to a Hugging Face model directory or an r1ray export (e.g. "
                                        "outputs/runs/sft/final), or run python jobs/distill.py, which fills it "
                                        "with the default SFT export")
        if problems:
            raise ValueError(problems[0])
        if d.mode == "logit":
            problems = tokenizer_problems(d.teacher, cfg.model.init_from)
            if problems:
                raise ValueError("the distillation config cannot run:\n  - " + "\n  - ".join(problems))
        resolved = cfg
        if d.mode == "sequence":
            if cfg.data.path and cfg.data.path != str(_traces_path(cfg)):
                raise ValueError("distill.mode=sequence trains on the teacher's own traces: unset data.path (or "
                                 "use distill.mode=logit to distil on data.path)")
            resolved = _with_traces(cfg, _teacher_traces(cfg))
        # SFT's checks with the student's tokenizer source (its own directory, or the teacher's); the accuracy
        # measured before training is the teacher's: the reference the student is held to
        sft_view = resolved.model_copy(update={
            "model": resolved.model.model_copy(update={"init_from": resolved.model.init_from or d.teacher}),
            "eval": resolved.eval.model_copy(update={"before": False})})
        problems = plan_problems(sft_view)
        if problems:
            raise ValueError("the distillation config cannot run:\n  - " + "\n  - ".join(problems))
        super().plan(sft_view)  # SFT's data checks (every jsonl row, batch sizes)
        baselines: dict[str, float] = {}
        if resolved.eval.before and resolved.eval_tasks:
            teacher_view = sft_view.model_copy(update={"model": ModelConfig(init_from=d.teacher)})
            baselines = {k.replace("accuracy_before", "teacher_accuracy", 1): v
                         for k, v in accuracy_before(teacher_view).items()}
        inputs = lineage_inputs(d.teacher, cfg.model.init_from)
        return RunPlan(config=resolved, inputs=inputs, baselines=baselines)

    # ---- worker side
    def setup(self, worker: WorkerInfo, resources: dict[str, Any]) -> None:
        cfg: DistillConfig = self.cfg
        if cfg.model.init_from is None:  # SFT's setup reads the tokenizer of model.init_from
            self.cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": cfg.distill.teacher})})
            super().setup(worker, resources)
            self.cfg = cfg
        else:
            super().setup(worker, resources)

    def build_model(self) -> Any:
        from r1ray.model import build_model

        model = build_model(self.cfg.model, self.tokenizer, seed=self.cfg.seed, precision=self.cfg.deepspeed.precision)
        log.info("student: %.2fM parameters (%s)", sum(p.numel() for p in model.parameters()) / 1e6,
                 self.cfg.model.init_from or f"preset {self.cfg.model.preset}")
        return model

    def frozen_models(self) -> dict[str, Any]:
        if self.cfg.distill.mode != "logit":
            return {}
        from r1ray.model.build import load_model

        return {"teacher": load_model(self.cfg.distill.teacher)}

    def loss(self, model: Any, batch: dict[str, Any], metrics: Metrics) -> Any:
        if self.cfg.distill.mode != "logit":
            return super().loss(model, batch, metrics)
        import torch
        import torch.nn.functional as F

        from r1ray.train.stages.sft_data import IGNORE

        d = self.cfg.distill
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        targets = batch["targets"]
        keep = targets != IGNORE
        student = model(input_ids=batch["input_ids"], **kwargs).logits[keep]
        with torch.no_grad():
            teacher = self.frozen["teacher"](input_ids=batch["input_ids"], **kwargs).logits[keep]
        if student.shape[-1] != teacher.shape[-1]:  # a resized embedding: compare the shared ids only
            v = min(student.shape[-1], teacher.shape[-1])
            student, teacher = student[..., :v], teacher[..., :v]
        kd = divergence(student, teacher, d.divergence, d.temperature, d.jsd_beta) * d.temperature ** 2
        total = kd.sum()
        n = max(int(keep.sum()), 1)
        metrics.mean("kd_loss", float(kd.detach().sum()) / n, weight=n)
        with torch.no_grad():
            metrics.mean("teacher_kl", float(divergence(student, teacher, "forward_kl").sum()) / n, weight=n)
        if d.ce_weight:
            ce = F.cross_entropy(student.float(), targets[keep], reduction="sum")
            metrics.mean("ce_loss", float(ce.detach()) / n, weight=n)
            total = total + d.ce_weight * ce
        return total

    def export_inputs(self) -> list[str]:

        d = self.cfg.distill
        return lineage_inputs(d.teacher, self.cfg.model.init_from)


# --------------------------------------------------------------------------------------------------
# Sequence mode: teacher traces on Ray Data through an engine pool (driver side)
# --------------------------------------------------------------------------------------------------


def _traces_path(cfg: DistillConfig) -> Path:
    return Path(cfg.storage.uri("runs", cfg.run_name, "teacher_traces.jsonl"))


def _teacher_traces(cfg: DistillConfig) -> Path:
    """Generate (or reuse: a pure function of the config) the teacher's traces as a jsonl of conversations."""
    import json
    import time

    import ray

    from r1ray.infer import SamplingParams
    from r1ray.infer.pool import EnginePool
    from r1ray.tasks.rewards import score
    from r1ray.train.stages.sft import task_problems

    d = cfg.distill
    out = _traces_path(cfg)
    done = out.with_suffix(".done")
    if done.exists():
        log.info("reusing the teacher's traces in %s", out)
        return out
    t0 = time.perf_counter()
    problems = task_problems(cfg, d.traces, "train")
    pool_name = f"r1ray-distill-{cfg.run_name}"
    pool = EnginePool.start(pool_name, d.teacher, n=d.num_engines, cpus_per_engine=d.cpus_per_engine)
    try:
        def generate(batch: dict[str, Any]) -> dict[str, Any]:
            from r1ray.infer.pool import EnginePool as Pool
            from r1ray.model.tokenizer import load_tokenizer

            tok = load_tokenizer(d.teacher)
            prompts = [tok.apply_chat_template(json.loads(m), tokenize=True, add_generation_prompt=True,
                                               return_dict=False) for m in batch["messages"]]
            params = [SamplingParams(max_tokens=d.max_new_tokens, temperature=d.teacher_temperature,
                                     seed=int(cfg.seed * 1_000_003 + i)) for i in batch["index"]]
            done = Pool.connect(pool_name).generate(prompts, params)
            return {"index": batch["index"], "text": [c.text for c in done]}

        items = [{"index": i, "messages": json.dumps(p.messages())} for i, p in enumerate(problems)]
        rows = ray.data.from_items(items).map_batches(generate, batch_size=64, num_cpus=0.1).take_all()
    finally:
        pool.stop()
    texts = {int(r["index"]): r["text"] for r in rows}
    completions = [texts[i] for i in range(len(problems))]
    correct = score(completions, problems, {"accuracy": 1.0}).per_reward["accuracy"]
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    with open(out.with_suffix(".tmp"), "w") as f:
        for p, text, ok in zip(problems, completions, correct, strict=True):
            if d.keep_correct and ok < 1.0:
                continue
            f.write(json.dumps({"messages": [*p.messages(), {"role": "assistant", "content": text}]}) + "\n")
            kept += 1
    if kept <= cfg.train.eval_samples:
        raise RuntimeError(f"the teacher's traces kept {kept} of {len(problems)} (keep_correct={d.keep_correct}): "
                           f"not more than the {cfg.train.eval_samples} held out for validation; raise "
                           "distill.traces, set distill.keep_correct=false, or use a stronger teacher")
    out.with_suffix(".tmp").replace(out)
    done.write_text(json.dumps({"traces": len(problems), "kept": kept}))
    log.info("teacher traces: %d of %d kept (teacher accuracy %.3f) in %.0fs -> %s", kept, len(problems),
             sum(correct) / len(correct), time.perf_counter() - t0, out)
    return out


def _with_traces(cfg: DistillConfig, path: Path) -> DistillConfig:
    """The config that fine-tunes the student on the traces (SFT on ``data.path``; sequence mode's loss)."""
    data = cfg.data.model_copy(update={"path": str(path)})
    # held-out accuracy keeps using the tasks' eval split
    eval_cfg = cfg.eval if cfg.eval.tasks is not None else cfg.eval.model_copy(update={"tasks": dict(cfg.data.tasks)})
    return cfg.model_copy(update={"data": data, "eval": eval_cfg,
                                  "distill": cfg.distill.model_copy(update={"mode": "sequence"})})


def run(cfg: DistillConfig, *, callbacks: Sequence[Any] = (), run_name: str | None = None,
        storage_path: str | None = None) -> TrainResult:
    """Distil ``cfg`` to the end (or to a preemption): ``r1ray.train.core.driver.run_stage`` with this stage."""
    return run_stage(DistillStage, cfg, callbacks=callbacks, run_name=run_name, storage_path=storage_path)


def job_summary(result: TrainResult) -> str:
    """What ``jobs/distill.py`` prints: the run's summary, the accuracy table and how much of the teacher's
    accuracy the student keeps."""
    lines = accuracy_table(result)
    teacher = result.metrics.get("teacher_accuracy")
    if teacher is not None and result.metrics.get("accuracy") is not None:
        kept = result.metrics["accuracy"] / teacher if teacher else float("nan")
        lines.append(f"  teacher accuracy {100 * teacher:.1f}%; the student keeps {100 * kept:.0f}% of it")
    return summary(result, lines)
