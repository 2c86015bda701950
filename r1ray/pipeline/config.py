"""The pipeline's config: which stages to run, each stage's config, and what the pipeline shares with them.

    stages: [data, pretrain, sft, grpo, evaluate, serve]     # in this order (a subsequence of STAGE_ORDER)
    pretrain:
      config: [configs/pretrain/debug.yaml]                  # the stage's YAML files (merged in order)
      overrides: {train.max_steps: 40}                        # dotted overrides on top
    sft: {overrides: {train.max_steps: 60}}

Every stage gets the pipeline's ``seed``, ``ray``, ``storage`` and ``logging`` and the run name
``<run_name>-<stage>``; its input (``data.path``, ``model.init_from``, ``distill.teacher``, the model to evaluate,
compress or serve) is wired from the artifact of the stage before it, never set by hand.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from r1ray.config import JobConfig, R1Config
from r1ray.train.registry import STAGES as TRAIN_STAGES

STAGE_ORDER = ("data", *TRAIN_STAGES, "evaluate", "compress", "serve")
"""The order stages run in (the training stages as ``r1ray.train.registry`` lists them); a pipeline runs a
subsequence of it."""


class StageSpec(R1Config):
    """One stage's config: YAML files and dotted overrides (validated by the stage's own config class)."""

    config: list[str] = Field(default_factory=list)
    """YAML files of the stage's config, merged in order (paths relative to the current directory)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted overrides applied after the files (``train.max_steps: 40``)."""


class PipelineConfig(JobConfig):
    """One config from corpus to served model: data -> pretrain -> SFT -> GRPO -> (distil) -> evaluate ->
    compress (with its quality gate) -> serve. A stage whose artifact exists with the same resolved config and
    the same input hashes is skipped; anything else reruns, and so does every stage after it."""

    run_name: str = "default"
    """Pipeline name: its state and report live in ``<storage.root>/pipeline/<run_name>/``, its runs are
    ``<storage.root>/runs/<run_name>-<stage>``."""
    stages: list[str] = Field(default_factory=lambda: ["data", "pretrain", "sft", "grpo", "evaluate", "compress",
                                                       "serve"])
    """Stages to run, in pipeline order (a subsequence of data, pretrain, sft, grpo, distill, evaluate,
    compress, serve)."""
    on_compress_refused: Literal["serve_uncompressed", "stop"] = "serve_uncompressed"
    """When the compression gate refuses the compressed model (it lost more than the gate allows):
    ``serve_uncompressed`` logs the refusal as an error with the gate's reasons, marks the stage ``refused`` in the
    summary and on the report card, and hands the uncompressed model to the stages after it (serve); ``stop``
    fails the pipeline there. Either way nothing that failed the gate is published, and the refusal is cached
    like an artifact: a rerun with the same compress config and input does not compress again."""
    from_stage: str | None = None
    """Start here (earlier stages must have their artifacts; they are reused, not rerun). ``--from STAGE``."""
    until_stage: str | None = None
    """Stop after this stage. ``--until STAGE``."""
    data: StageSpec = StageSpec()
    """The data stage (``PrepareDataConfig``)."""
    pretrain: StageSpec = StageSpec()
    """Pretraining (``PretrainConfig``)."""
    sft: StageSpec = StageSpec()
    """SFT (``SFTConfig``)."""
    grpo: StageSpec = StageSpec()
    """GRPO (``GRPOConfig``)."""
    distill: StageSpec = StageSpec()
    """Distillation (``DistillConfig``): the student replaces the model downstream."""
    evaluate: StageSpec = StageSpec()
    """Evaluation (``EvaluateConfig``) of the model the training stages produced."""
    compress: StageSpec = StageSpec()
    """Compression with its quality gate (``CompressConfig``); ``on_compress_refused`` says what a refusal does."""
    serve: StageSpec = StageSpec()
    """Serving (``ServeConfig``) of the final model; ``serve.overrides.blocking: false`` returns at once."""
    report: bool = True
    """Write the report card (``report.md`` with PNG plots) after the run."""

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGE_ORDER)}")
        if len(set(v)) != len(v) or sorted(v, key=STAGE_ORDER.index) != v:
            raise ValueError(f"stages must be distinct and in pipeline order {list(STAGE_ORDER)}, got {v}")
        if not v:
            raise ValueError("name at least one stage")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> PipelineConfig:
        problems = []
        for field in ("from_stage", "until_stage"):
            value = getattr(self, field)
            if value is not None and value not in self.stages:
                problems.append(f"{field}={value!r} is not one of the pipeline's stages {self.stages}")
        if not problems and self.from_stage and self.until_stage and \
                self.stages.index(self.from_stage) > self.stages.index(self.until_stage):
            problems.append(f"from_stage={self.from_stage!r} comes after until_stage={self.until_stage!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def spec(self, stage: str) -> StageSpec:
        return getattr(self, stage)
