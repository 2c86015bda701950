"""The evaluation job's typed config: which model (an export, a run's newest export, or an OpenAI-compatible
endpoint), which suites (perplexity, task accuracy with pass@k/maj@k, BLEU/ROUGE), the engines that run an
export, and an optional second model to compare against on the same items."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from r1ray.config import JobConfig, R1Config
from r1ray.tasks.base import MAX_COMPLETION_TOKENS

__all__ = ["EndpointConfig", "EngineSettings", "EvaluateConfig", "ModelSpec", "PerplexitySuite", "ReferenceSuite",
           "TasksSuite"]


class EndpointConfig(R1Config):
    """Any OpenAI-compatible server (r1ray's Serve, vLLM, ...)."""

    url: str
    """Base URL of the API, e.g. ``http://127.0.0.1:8000/v1`` (``/completions`` and ``/chat/completions`` are
    appended)."""
    model: str
    """The model id the server expects in each request's ``model``."""
    api_key_env: str | None = None
    """Environment variable holding the bearer key (read when the job starts; the key is never written out).
    Unset: no ``Authorization`` header."""
    concurrency: int = Field(default=8, ge=1)
    """Requests in flight per Ray Data task (each task sends one unit of requests)."""
    timeout_s: float = Field(default=300.0, gt=0)
    """Per-request timeout."""
    retries: int = Field(default=3, ge=0)
    """Retries of a request answered 429/503 or not answered (connection error), with backoff; other errors
    (4xx) fail the job at once with the server's message."""

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


class ModelSpec(R1Config):
    """The model to evaluate: ``path`` (an export directory or a run directory, whose newest export is taken)
    or ``endpoint``. A bare string in YAML or on the command line (``model=outputs/runs/sft``) is ``path``."""

    path: str | None = None
    """A Hugging Face model directory (an r1ray export, or any Llama/Qwen2-style directory), or a run
    directory (``<storage.root>/runs/<name>``: its newest complete export). Local or object-store URI."""
    endpoint: EndpointConfig | None = None
    """An OpenAI-compatible endpoint instead of a directory."""
    name: str | None = None
    """Label in tables and the audit file. Unset: the run's name (for ``.../runs/<name>/final``), the
    directory's name, or the endpoint's model id."""

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one(self) -> ModelSpec:
        if (self.path is None) == (self.endpoint is None):
            raise ValueError("give exactly one of path (an export or run directory) or endpoint "
                             "({url, model, api_key_env})")
        return self


class EngineSettings(R1Config):
    """The pool of engine actors that runs an export (``r1ray.infer.pool.EnginePool``); endpoints ignore it."""

    num_engines: int = Field(default=1, ge=1)
    """Engine actors, each in its own placement group. Leave Ray Data a CPU: engines x cpus_per_engine must
    stay below the cluster's CPUs (on 2 cores an actor pool holding every CPU deadlocks the pipeline)."""
    cpus_per_engine: float = Field(default=1.0, gt=0)
    """CPUs per engine (also its torch threads on CPU)."""
    gpus_per_engine: float = Field(default=0.0, ge=0)
    """GPUs per engine (the vLLM engine or the HF engine on CUDA)."""
    backend: Literal["hf", "vllm", "auto"] = "hf"
    """``hf`` (CPU or GPU), ``vllm`` (GPU, the ``gpu`` extra), ``auto`` (vLLM when usable)."""
    dtype: str = "auto"
    """Weights dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16``."""
    unit_size: int = Field(default=16, ge=1)
    """Prompts per unit of work: one Ray Data row, generated alone as one batch on one engine, so the
    results do not depend on the number of engines (``r1ray.infer.pool``)."""


class PerplexitySuite(R1Config):
    """Perplexity and bits per token/byte on a data artifact's packed rows or on jsonl/text files."""

    enabled: bool = True
    """Run this suite."""
    data: str | None = None
    """A data artifact directory (``<storage.root>/data/<name>``): its packed rows of ``split`` are scored as
    they are (each row's tokens after the first). Its tokenizer must be the model's."""
    split: Literal["train", "validation", "test"] = "validation"
    """Split of ``data``."""
    files: list[str] = Field(default_factory=list)
    """jsonl files (one document per line, field ``text_field``) or text files (one document each), scored as
    text: each document is cut into chunks of at most ``chunk_chars`` characters at whitespace, each chunk a
    prompt the engine or server tokenizes itself (so an export and an endpoint score the same chunks)."""
    text_field: str = "text"
    """Field of each jsonl line holding the document."""
    chunk_chars: int = Field(default=2000, ge=16)
    """Longest chunk of a file's document, in characters (keep chunk tokens below the model's context)."""
    max_rows: int | None = Field(default=None, ge=1)
    """Rows (data) or chunks (files) scored at most, the first ones in order. Unset: all. A data artifact's
    split is ordered by source, so a cap scores a biased subset: on the default corpus the first 64 validation
    rows (mostly Python source) give 5.49 nats/token for the default export, all 127 give 3.37, the
    ``val_loss`` its training reported."""
    batch_rows: int = Field(default=8, ge=1)
    """Rows per engine batch (memory: the engine keeps batch x tokens x vocab logits)."""

    @model_validator(mode="after")
    def _source(self) -> PerplexitySuite:
        if self.data and self.files:
            raise ValueError("give data (a data artifact) or files (jsonl/text), not both")
        return self


class TasksSuite(R1Config):
    """Accuracy on the task registry (``r1ray.tasks``), per difficulty level: greedy exact match, and pass@k /
    maj@k from ``samples`` sampled completions per problem."""

    enabled: bool = True
    """Run this suite."""
    tasks: dict[str, float] = Field(default_factory=lambda: {"arithmetic": 1.0})
    """Task mix ``{name: weight}`` (``r1ray.tasks.registry``; ``gsm8k`` reads your file, see ``options``)."""
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Constructor options per task, e.g. ``{gsm8k: {path: test.jsonl, eval_path: test.jsonl}}`` (with
    ``eval_path`` the whole file is the eval split)."""
    difficulties: list[int] = Field(default_factory=lambda: [1, 2, 3])
    """Levels to evaluate; a task of the mix without a level is left out of that level."""
    items_per_level: int = Field(default=100, ge=1)
    """Problems per difficulty level (a single file-backed task, like gsm8k, gives at most its size)."""
    split: Literal["eval", "train"] = "eval"
    """Task split (eval is disjoint from what the training stages draw)."""
    prompt_format: Literal["auto", "chat", "question"] = "auto"
    """``chat`` (the chat template; SFT/GRPO models), ``question`` (the pretraining layout
    ``Question: ...\\n``; base models), ``auto``: ``question`` for an export whose manifest says stage
    ``pretrain``, else ``chat`` (endpoints too)."""
    prefill_think: bool = False
    """End each prompt with ``<think>\\n`` (templates that prefill the reasoning). Not with an endpoint in
    chat format (the chat API cannot prefill)."""
    max_tokens: int = Field(default=MAX_COMPLETION_TOKENS, ge=1)
    """Longest completion, in tokens."""
    no_think: bool = True
    """Also score greedy completions with the thinking suppressed: the prompt ends in ``<think>\n</think>\n<answer>``
    and the completion gets ``NO_THINK_MAX_TOKENS`` (16),
    so the model must answer at once (``accuracy_no_think``). The gap to ``accuracy`` is what the reasoning
    carries. Needs a prompt the job renders itself (an export, or an endpoint in ``question`` format)."""
    samples: int = Field(default=4, ge=0)
    """Sampled completions per problem for pass@k and maj@k; 0 turns them off (greedy only)."""
    k: list[int] = Field(default_factory=lambda: [1, 4])
    """The k of pass@k and maj@k, each <= ``samples``."""
    temperature: float = Field(default=0.8, gt=0)
    """Sampling temperature of the ``samples`` (greedy accuracy always decodes greedily)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling of the ``samples``."""
    verify_timeout_s: float = Field(default=2.0, gt=0)
    """Per-completion verifier time limit (the reward sandbox)."""

    @model_validator(mode="after")
    def _check(self) -> TasksSuite:
        problems = []
        if self.enabled and not any(w > 0 for w in self.tasks.values()):
            problems.append("tasks: give at least one task with a weight > 0, e.g. {arithmetic: 1.0}")
        if self.samples and any(not 1 <= k <= self.samples for k in self.k):
            problems.append(f"k: every k must be in [1, samples={self.samples}], got {self.k}")
        if not self.difficulties:
            problems.append("difficulties: give at least one level, e.g. [1]")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ReferenceSuite(R1Config):
    """BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score) of greedy completions against references."""

    path: str | None = None
    """A jsonl of ``{prompt_field: ..., reference_field: ...}`` lines. Unset: this suite is off."""
    prompt_field: str = "prompt"
    """Field of each line holding the prompt (sent as is: completions API)."""
    reference_field: str = "reference"
    """Field of each line holding the reference text."""
    max_items: int | None = Field(default=None, ge=1)
    """Lines evaluated at most (the first ones). Unset: all."""
    max_tokens: int = Field(default=128, ge=1)
    """Longest completion, in tokens."""
    stop: list[str] = Field(default_factory=lambda: ["\n\n"])
    """Stop strings (the completion ends before them)."""


class EvaluateConfig(JobConfig):
    """Evaluate a model (an export or an OpenAI-compatible endpoint) on perplexity, task accuracy (greedy,
    pass@k, maj@k) and BLEU/ROUGE, with batch inference on Ray Data; optionally compare a second model on the
    same items with bootstrap confidence intervals. Writes ``<storage.root>/eval/<run_name>/``."""

    seed: int = 0
    """Seed of the task problems drawn, of the sampled completions (sample j of a problem is seeded by a hash
    of (seed, the problem's uid, j): the same for every model and every run) and of the bootstrap."""
    run_name: str = "default"
    """Name of the output artifact: ``<storage.root>/eval/<run_name>/`` (replaced when it exists)."""
    model: ModelSpec | None = None
    """The model to evaluate. Unset: ``python jobs/evaluate.py`` evaluates the default pretraining run's newest
    export (trained first when missing); the library's ``run`` refuses an unset model."""
    compare: ModelSpec | None = None
    """A second model evaluated on the same items; the table then shows ``compare - model`` per metric with a
    paired bootstrap confidence interval."""
    engine: EngineSettings = EngineSettings()
    """Engines for exports."""
    perplexity: PerplexitySuite = PerplexitySuite()
    """Perplexity suite. With no ``data``/``files`` it is skipped (the job's embedded default fills ``data`` with
    the default data artifact)."""
    tasks: TasksSuite = TasksSuite()
    """Task accuracy suite."""
    reference: ReferenceSuite = ReferenceSuite()
    """BLEU/ROUGE suite (on when ``reference.path`` is set)."""
    bootstrap_resamples: int = Field(default=2000, ge=100)
    """Resamples of each comparison's paired bootstrap."""
    ci_level: float = Field(default=0.95, gt=0, lt=1)
    """Confidence level of each comparison's interval."""
    progress_every_s: float = Field(default=10.0, gt=0)
    """Seconds between progress/ETA log lines."""

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        endpoints = [m for m in (self.model, self.compare) if m is not None and m.endpoint is not None]
        if endpoints and self.tasks.enabled and self.tasks.prefill_think and self.tasks.prompt_format != "question":
            raise ValueError("tasks.prefill_think with an endpoint needs tasks.prompt_format=question (the chat "
                             "API cannot prefill <think>)")
        return self
