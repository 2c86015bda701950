"""The compression job's typed config: which model, which methods (structured pruning with an optional recovery
fine-tune, INT8/FP8 weight quantization, GGUF files for llama.cpp), the evaluation the quality gate reads, the
gate's limits and the speed measurements of the report."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from r1ray.config import JobConfig, R1Config
from r1ray.eval.config import EngineSettings, PerplexitySuite, ReferenceSuite, TasksSuite
from r1ray.tasks.base import MAX_COMPLETION_TOKENS

__all__ = ["CompressConfig", "CompressEvalConfig", "GateConfig", "GGUFConfig", "PruneConfig", "QuantizeConfig",
           "RecoveryConfig", "ReportConfig", "QUANT_METHODS"]

QUANT_METHODS = ("none", "int8", "int8_torchao", "fp8")
"""``int8``: INT8 weights per output channel with dynamic INT8 activations (torch's x86/fbgemm kernels; the
fastest CPU decode measured here, see docs/compress.md), r1ray's safetensors format; ``int8_torchao``: torchao
INT8 weight-only, a transformers-native directory (slower than fp32 on CPU with torchao 0.18); ``fp8``: torchao
FP8 (e4m3) weight-only, CUDA GPUs of compute capability >= 8.9 only; ``none``: no quantization."""


class RecoveryConfig(R1Config):
    """A short fine-tune of the pruned model through the SFT stage (``r1ray.train.stages.sft.run``) before quantizing."""

    enabled: bool = False
    """Fine-tune the pruned model before quantization (needs Ray; minutes)."""
    sft: dict[str, Any] = Field(default_factory=lambda: {"train": {"max_steps": 50}})
    """Overrides of the SFT stage's config (``SFTConfig``, validated before any compute); ``model.init_from``
    and ``run_name`` are set by the job (``<run_name>-recovery``), ``seed``/``storage``/``ray``/``logging`` are
    inherited from this job."""


class PruneConfig(R1Config):
    """Structured pruning: whole attention heads and MLP channels with the lowest importance, the same count in
    every layer (transformers' Llama/Qwen2 need uniform shapes), so the result stays a plain HF directory."""

    enabled: bool = False
    """Prune before quantizing."""
    heads_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of query heads to remove in every layer (rounded to a whole number of ``head_unit``s)."""
    head_unit: Literal["query", "kv_group"] = "query"
    """With grouped-query attention: ``query`` removes the same number of query heads from every KV group
    (KV heads kept); ``kv_group`` removes whole KV groups (a KV head with all its query heads)."""
    mlp_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of MLP intermediate channels to remove in every layer (rounded to ``mlp_multiple_of``)."""
    mlp_multiple_of: int = Field(default=1, ge=1)
    """Keep the MLP width a multiple of this (32 keeps every tensor of a GGUF Q8_0 file quantizable)."""
    score: Literal["magnitude", "activation"] = "activation"
    """Importance of a head/channel: ``magnitude`` (weight norms only) or ``activation`` (mean activation
    magnitude on calibration text times the norm of the weights it feeds)."""
    calibration_texts: int = Field(default=32, ge=1)
    """Calibration documents (``activation``): the perplexity suite's texts when it has files, else the task
    suite's prompts with their worked solutions."""
    calibration_max_tokens: int = Field(default=256, ge=8)
    """Tokens per calibration document at most."""
    recovery: RecoveryConfig = RecoveryConfig()
    """Optional recovery fine-tune."""


class QuantizeConfig(R1Config):
    """Weight quantization of the (pruned) model, saved as safetensors that ``from_pretrained`` reloads."""

    method: Literal["none", "int8", "int8_torchao", "fp8"] = "int8"
    """See ``QUANT_METHODS``: int8 (CPU serving default), int8_torchao, fp8 (GPU >= sm89), none."""
    output_head: bool = True
    """Also quantize the output head (``lm_head``, vocabulary x hidden: a large share of a small model's decode
    work). A head tied to the input embedding gets its own INT8 copy (the embedding stays fp32), so the file
    holds vocabulary x hidden bytes more than with the head left tied and unquantized."""


class GGUFConfig(R1Config):
    """GGUF files for llama.cpp, written from the (pruned, unquantized) model with the ``gguf`` package."""

    types: list[Literal["f16", "q8_0"]] = Field(default_factory=lambda: ["f16", "q8_0"])
    """File types to write (empty: no GGUF)."""
    verify: Literal["auto", "always", "never"] = "auto"
    """Load each file in llama.cpp (``llama-cpp-python``) and compare its greedy tokens with the HF model's:
    ``auto`` when llama-cpp-python is installed (a skip is logged and written in the report), ``always`` fails
    the job without it."""
    prompts: list[str] = Field(default_factory=lambda: ["1 + 1 =", "The answer is", "<think>"])
    """Prompts of the greedy comparison (also the report's llama.cpp speed prompt: the first)."""
    max_tokens: int = Field(default=16, ge=1)
    """Greedy tokens compared per prompt."""
    min_match: dict[str, float] = Field(default_factory=lambda: {"f16": 1.0, "q8_0": 0.9})
    """Least share of prompts whose greedy tokens must equal the HF model's, per type (Q8_0 rounds weights, so
    a near-tie may flip)."""


class CompressEvalConfig(R1Config):
    """The evaluation the gate reads, run by the evaluation job (``r1ray.eval.run``) on the base and the
    compressed model on the same items."""

    perplexity: PerplexitySuite = PerplexitySuite()
    """Perplexity suite (``files`` or ``data``; without either the job's embedded default fills ``data`` with
    the default data artifact)."""
    tasks: TasksSuite = TasksSuite(difficulties=[1, 2, 3], items_per_level=100, samples=0, k=[],
                                   max_tokens=MAX_COMPLETION_TOKENS,
                                   no_think=False)
    """Task accuracy (greedy, 100 held-out problems of each arithmetic level)."""
    reference: ReferenceSuite = ReferenceSuite()
    """Reference-based suite (exact match, ROUGE, BLEU) on a jsonl of prompt/reference pairs."""
    engine: EngineSettings = EngineSettings(num_engines=1, cpus_per_engine=1.0, unit_size=16)
    """Engine actors that run each model."""


class GateConfig(R1Config):
    """The quality gate: refuse to publish a compressed model that lost too much."""

    accuracy_metric: str = "tasks/accuracy"
    """``suite/metric`` of the evaluation table read as accuracy (a share in [0, 1]), e.g. ``tasks/accuracy`` or
    ``reference/exact_match``; its suite must be enabled."""
    max_accuracy_drop_points: float = Field(default=1.5, ge=0)
    """Refuse when accuracy falls by more than this many points (100 x share)."""
    max_perplexity_increase_pct: float = Field(default=5.0, ge=0)
    """Refuse when perplexity rises by more than this many percent."""

    @field_validator("accuracy_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v.count("/") != 1 or not all(v.split("/")):
            raise ValueError(f"must be 'suite/metric' (e.g. tasks/accuracy), got {v!r}")
        return v


class ReportConfig(R1Config):
    """Speed measurements of the report table (CPU, in this process)."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1, 16])
    """Decode batch sizes measured."""
    new_tokens: int = Field(default=32, ge=2)
    """Tokens decoded per measurement (greedy, no early stop)."""
    prompt_tokens: int = Field(default=16, ge=1)
    """Prompt length of each measurement."""
    repeats: int = Field(default=3, ge=1)
    """Measurements per model and batch size (the median is reported; p50 latency is over batch-1 runs)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """CPU threads of the measurement. Unset: torch's default."""


class CompressConfig(JobConfig):
    """Compress a model (prune, quantize, GGUF), evaluate base and compressed with the evaluation job, and
    publish ``<storage.root>/runs/<run_name>/final`` only when the quality gate passes. Always writes the report
    (size, decode speed, latency, accuracy, perplexity) as ``report.md`` + ``report.json``."""

    run_name: str = "compress"
    """Output run directory ``<storage.root>/runs/<run_name>``: ``final/`` on pass (what ``jobs/serve.py
    run_name=<run_name>`` serves), ``rejected/`` (report only) on refusal."""
    model: str | None = None
    """The model to compress: a Hugging Face export directory or a run directory (its newest export). Unset:
    ``python jobs/compress.py`` compresses the default SFT run's export (trained first when missing); the
    library's ``run`` refuses an unset model."""
    prune: PruneConfig = PruneConfig()
    """Structured pruning (off by default)."""
    quantize: QuantizeConfig = QuantizeConfig()
    """Weight quantization."""
    gguf: GGUFConfig = GGUFConfig()
    """GGUF files for llama.cpp."""
    eval: CompressEvalConfig = CompressEvalConfig()
    """What the gate evaluates."""
    gate: GateConfig = GateConfig()
    """The gate's limits."""
    report: ReportConfig = ReportConfig()
    """Speed measurements."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the compression and the speed measurements run (``fp8`` needs ``cuda``)."""

    @model_validator(mode="after")
    def _check(self) -> CompressConfig:
        problems = []
        suite = self.gate.accuracy_metric.split("/")[0]
        enabled = {"tasks": self.eval.tasks.enabled, "reference": self.eval.reference.path is not None,
                   "perplexity": self.eval.perplexity.enabled}
        if suite not in enabled:
            problems.append(f"gate.accuracy_metric: suite {suite!r} is unknown; use tasks/... or reference/...")
        elif not enabled[suite]:
            problems.append(f"gate.accuracy_metric={self.gate.accuracy_metric!r} but the {suite} suite is off "
                            f"(enable eval.{suite}{'.path' if suite == 'reference' else '.enabled'})")
        if self.quantize.method == "int8" and self.device != "cpu":
            problems.append("quantize.method=int8 (dynamic INT8, x86 kernels) runs on CPU: set device=cpu, or "
                            "use quantize.method=fp8 on a GPU")
        if self.quantize.method == "fp8" and self.device != "cuda":
            problems.append("quantize.method=fp8 needs device=cuda (FP8 weight-only runs on GPUs of compute "
                            "capability >= 8.9); use quantize.method=int8 on CPU")
        if self.prune.enabled and not (self.prune.heads_fraction or self.prune.mlp_fraction):
            problems.append("prune.enabled with heads_fraction=0 and mlp_fraction=0 removes nothing; set one")
        if self.prune.recovery.enabled and not self.prune.enabled:
            problems.append("prune.recovery.enabled needs prune.enabled")
        if not (self.prune.enabled or self.quantize.method != "none" or self.gguf.types):
            problems.append("nothing to do: enable prune, set quantize.method, or list gguf.types")
        bad = set(self.gguf.min_match) - {"f16", "q8_0"}
        if bad:
            problems.append(f"gguf.min_match: unknown types {sorted(bad)}; use f16, q8_0")
        if problems:
            raise ValueError("; ".join(problems))
        return self
