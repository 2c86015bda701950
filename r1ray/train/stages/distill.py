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
from typing import Any, Literal

from pydantic import Field

from r1ray.config import R1Config
from r1ray.model.build import ModelConfig
from r1ray.observe.log import get_logger
from r1ray.tasks.base import MAX_COMPLETION_TOKENS
from r1ray.train.core.config import TrainLoopConfig
from r1ray.train.core.driver import TrainResult, run_stage, summary  # noqa: F401 - summary: the job's closing text
from r1ray.train.core.inputs import lineage_inputs, local_start, start_problems
from r1ray.train.stage import Metrics, RunPlan
from r1ray.train.stages.sft import (
    SFTConfig,
    SFTDataConfig,
    SFTStage,
    accuracy_before,
    accuracy_table,
    plan_problems,
)
from r1ray.train.stages.traces import TRACES_FILE, TracesConfig

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
    temperature: float = Field(default=1.0, gt=0)
    """Logit mode: softmax temperature of both distributions (the loss is scaled by its square). 1 and 2 measured
    equal after 600 steps of the default (held-out accuracy 7.3% and 8.0%); the default's 1,500 steps ran at 1."""
    jsd_beta: float = Field(default=0.5, gt=0, lt=1)
    """``jsd``: mixture weight of the teacher, m = beta * teacher + (1 - beta) * student."""
    ce_weight: float = Field(default=0.0, ge=0)
    """Logit mode: weight of the data's cross-entropy added to the divergence (0: pure distillation)."""
    student_init: Literal["prune", "fresh"] = "prune"
    """How a student without ``model.init_from`` starts: ``prune`` cuts it out of the teacher in the shape of
    ``model.preset`` (hidden width, layers, KV heads, MLP channels; the teacher's head size), keeping what matters
    most on ``calibration_samples`` training conversations (``r1ray.model.shrink``: Minitron's prune, then
    distil); ``fresh``: random weights, so the student learns language and the task from the teacher alone."""
    calibration_samples: int = Field(default=64, ge=1)
    """``prune``: training conversations the importance of every channel, head and layer is measured on."""
    traces: int = Field(default=2000, ge=1)
    """Sequence mode: task prompts the teacher answers (the student's training conversations)."""
    keep_correct: bool = True
    """Sequence mode: keep only traces whose answer the task's verifier accepts (rejection sampling)."""
    teacher_temperature: float = Field(default=0.0, ge=0)
    """Sequence mode: sampling temperature of the teacher (0: greedy)."""
    max_new_tokens: int = Field(default=MAX_COMPLETION_TOKENS, ge=1)
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
    train: TrainLoopConfig = TrainLoopConfig(max_steps=1500, global_batch_size=16, micro_batch_size=4,
                                             eval_every=300, eval_samples=64, log_every=50)
    """SFT's loop for 1,500 steps: a student cut out of the teacher keeps 8% of its accuracy after 600 and 58% after
    1,500, still rising (docs/reasoning.md)."""
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
            if not cfg.data.path:
                raise ValueError("distill.mode=sequence fine-tunes on the teacher's traces and data.path is unset: "
                                 "python jobs/distill.py (or the pipeline) generates them as an artifact of their "
                                 "own (r1ray.train.stages.traces) and sets data.path to its traces.jsonl")
            resolved = _with_traces(cfg)
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
        return RunPlan(config=resolved, inputs=_lineage(resolved), baselines=baselines)

    # ---- worker side
    def tokenizer_source(self) -> str:
        """The student's own directory, or (a fresh student) the teacher's: logit KD compares the same ids."""
        return self.cfg.model.init_from or self.cfg.distill.teacher

    def build_model(self) -> Any:
        from r1ray.model import build_model

        cfg = self.cfg
        if cfg.model.init_from is None and cfg.distill.student_init == "prune":
            model, how = self._pruned_student(), f"cut out of the teacher in the shape of preset {cfg.model.preset}"
        else:
            model = build_model(cfg.model, self.tokenizer, seed=cfg.seed, precision=cfg.deepspeed.precision)
            how = cfg.model.init_from or f"preset {cfg.model.preset}, fresh"
        log.info("student: %.3fM parameters (%s)", sum(p.numel() for p in model.parameters()) / 1e6, how)
        return model

    def _pruned_student(self) -> Any:
        """The teacher, cut to ``model.preset``'s shape on the first ``calibration_samples`` conversations."""
        import torch

        from r1ray.model.build import PRECISION_DTYPES, PRESETS, load_model
        from r1ray.model.shrink import ShrinkShape, shrink_model
        from r1ray.train.stages.sft_data import tokenize_conversation

        cfg = self.cfg
        p = PRESETS[cfg.model.preset]
        shape = ShrinkShape(p["hidden_size"], p["num_hidden_layers"], p["num_key_value_heads"], p["intermediate_size"])
        teacher = load_model(local_start(cfg.distill.teacher))
        calib = [tokenize_conversation(self.tokenizer, c, cfg.data.max_length).ids.tolist()
                 for c in self.train[: cfg.distill.calibration_samples]]
        student = shrink_model(teacher, shape, calib)  # copies: the teacher is left unchanged
        self._teacher = teacher  # logit distillation's frozen teacher (the loop asks for it next): loaded once
        return student.to(getattr(torch, PRECISION_DTYPES[cfg.deepspeed.precision]))

    def frozen_models(self) -> dict[str, Any]:
        teacher, self._teacher = getattr(self, "_teacher", None), None
        if self.cfg.distill.mode != "logit":
            return {}
        from r1ray.model.build import load_model

        return {"teacher": teacher if teacher is not None else load_model(local_start(self.cfg.distill.teacher))}

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
        return _lineage(self.cfg)


# --------------------------------------------------------------------------------------------------
# Sequence mode: the teacher's traces (an artifact of their own: r1ray.train.stages.traces)
# --------------------------------------------------------------------------------------------------


def traces_config(cfg: DistillConfig) -> TracesConfig:
    """The traces step of a sequence-mode config: the teacher answers ``distill.traces`` prompts of the student's
    task mix and levels (the train split); at least ``train.eval_samples`` must be kept for validation."""
    d = cfg.distill
    if not d.teacher:
        raise ValueError("distill.teacher is unset: the traces step needs the teacher")
    return TracesConfig(teacher=d.teacher, run_name=cfg.run_name, seed=cfg.seed, tasks=dict(cfg.data.tasks),
                        levels=dict(cfg.data.levels), task_options=dict(cfg.data.task_options), count=d.traces,
                        keep_correct=d.keep_correct, min_kept=cfg.train.eval_samples,
                        temperature=d.teacher_temperature, max_new_tokens=d.max_new_tokens,
                        num_engines=d.num_engines, cpus_per_engine=d.cpus_per_engine, storage=cfg.storage)


def _lineage(cfg: DistillConfig) -> list[str]:
    """The teacher, a student start and (sequence mode) the traces artifact, where they are r1ray artifacts."""
    traces = None
    if cfg.distill.mode == "sequence" and cfg.data.path and cfg.data.path.endswith("/" + TRACES_FILE):
        traces = cfg.data.path[: -len(TRACES_FILE) - 1]
    return lineage_inputs(cfg.distill.teacher, cfg.model.init_from, traces)


def _with_traces(cfg: DistillConfig) -> DistillConfig:
    """Sequence mode's resolved config: SFT on the traces in ``data.path``, held-out accuracy on the tasks' eval
    split of the student's task mix."""
    eval_cfg = cfg.eval if cfg.eval.tasks is not None else cfg.eval.model_copy(update={"tasks": dict(cfg.data.tasks)})
    return cfg.model_copy(update={"eval": eval_cfg})


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
