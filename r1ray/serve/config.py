"""The serving job's config (``jobs/serve.py``; ``build_app(args)`` takes the same fields as a dict).

Import-light on purpose: pydantic only, so a typo in a serve YAML fails in well under two seconds.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from r1ray.config import JobConfig, R1Config


class HttpConfig(R1Config):
    """Where Serve's HTTP proxy listens."""

    host: str = "127.0.0.1"
    """Interface of the HTTP proxy. ``0.0.0.0`` on a cluster (or in a container) to accept outside traffic."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port of the HTTP proxy."""
    route_prefix: str = "/"
    """Route prefix of the app (``/`` serves ``/v1/...`` at the root)."""

    @field_validator("route_prefix")
    @classmethod
    def _slash(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', e.g. '/{v}'")
        return v


class AutoscalingConfig(R1Config):
    """Serve autoscaling: replicas follow the number of ongoing requests."""

    min_replicas: NonNegativeInt = 1
    """Fewest replicas (0 lets the app scale to zero; the first request then waits for a cold start)."""
    max_replicas: int = Field(default=2, ge=1)
    """Most replicas."""
    target_ongoing_requests: PositiveFloat = 8.0
    """Ongoing requests per replica the autoscaler aims for; more than that adds replicas."""
    upscale_delay_s: NonNegativeFloat = 10.0
    """How long the load must stay high before a replica is added."""
    downscale_delay_s: NonNegativeFloat = 60.0
    """How long the load must stay low before a replica is removed."""

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling.max_replicas ({self.max_replicas}) < autoscaling.min_replicas ({self.min_replicas}); "
                "raise max_replicas or lower min_replicas"
            )
        return self


class DeploymentConfig(R1Config):
    """Replicas and what each one reserves."""

    num_replicas: int = Field(default=1, ge=1)
    """Fixed number of replicas; ignored when ``autoscaling`` is set."""
    autoscaling: AutoscalingConfig | None = None
    """Autoscale between min and max replicas; unset: ``num_replicas`` fixed replicas."""
    num_cpus: float = Field(default=1.0, gt=0)
    """Logical CPUs per replica (also the replica's torch threads on CPU, unless ``engine.torch_threads``)."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs per replica (1 for the vLLM engine or a CUDA HF engine)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica (e.g. ``{"serve": 1}`` to pin replicas to tagged nodes)."""
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0)
    """On shutdown (SIGTERM to ``jobs/serve.py``, a scale-down, a redeploy), how long a replica keeps running to
    finish its in-flight requests before it is stopped."""


class EngineConfig(R1Config):
    """The generation engine inside each replica."""

    backend: Literal["hf", "vllm", "auto"] = "hf"
    """``hf``: r1ray's batched KV-cache engine on any HF model dir (CPU or GPU). ``vllm``: vLLM (GPU, needs the
    ``gpu`` extra). ``auto``: vLLM when importable with CUDA, otherwise ``hf`` (and the log says so)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the HF engine; ``auto`` picks CUDA when the replica has a GPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; ``auto``: float32 on CPU (bf16 is ~8x slower there), bfloat16 on GPU."""
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    """Most sequences decoded together. 1 turns batching off (the benchmark's baseline)."""
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=5)
    """When the engine is idle, how long the first request waits for others to share its batch. Requests that
    arrive while a batch is running join it at the next step (continuous batching)."""
    max_model_len: int | None = Field(default=None, ge=8)
    """Context limit (prompt + max_tokens); unset: the model's ``max_position_embeddings``."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads per replica; unset: ``deployment.num_cpus`` rounded up."""
    prefix_cache_mb: float = Field(default=256.0, ge=0)
    """Automatic prefix caching (HF engine): memory for the KV of prompt prefixes already computed, reused by later
    requests that share them (a system prompt, a few-shot block, a conversation so far). Least recently used
    prefixes are evicted first; 0 turns it off. Hits and cached tokens are in the metrics."""
    prefix_block_tokens: int = Field(default=16, ge=1, le=4096)
    """Prefixes are cached and matched in whole blocks of this many tokens."""


class ReasoningConfig(R1Config):
    """Thinking of reasoning models: the budgets ``reasoning_effort`` maps to."""

    effort_budgets: dict[Literal["none", "minimal", "low", "medium", "high"], int | None] = Field(
        default_factory=lambda: {"none": 0, "minimal": 16, "low": 64, "medium": 256, "high": None})
    """Thinking tokens (``<think>`` included) a request's ``reasoning_effort`` allows; None: no limit. When spent,
    the server writes ``</think>`` and the model answers. A request's ``thinking_token_budget`` wins."""

    @field_validator("effort_budgets")
    @classmethod
    def _budgets(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        bad = {k: b for k, b in v.items() if b is not None and b < 0}
        if bad:
            raise ValueError(f"budgets must be integers >= 0 or null, got {bad}")
        return v


class LimitsConfig(R1Config):
    """Admission control and request bounds."""

    max_queue: int = Field(default=64, ge=1)
    """Sequences a replica accepts at once (running plus waiting); beyond that requests get 429 + Retry-After."""
    retry_after_s: int = Field(default=1, ge=1)
    """Seconds the 429 answer tells clients to wait (``Retry-After``)."""
    default_max_tokens: int = Field(default=16, ge=1)
    """``max_tokens`` of a completion request that leaves it out (OpenAI's default is 16)."""
    default_chat_max_tokens: int = Field(default=256, ge=1)
    """``max_tokens`` of a chat request that leaves it out (capped by the room left in the context)."""
    max_n: int = Field(default=8, ge=1)
    """Largest ``n`` (choices per prompt) a request may ask for."""
    max_prompts: int = Field(default=32, ge=1)
    """Largest list of prompts one completion request may carry (a batching harness such as lm-eval sends its
    ``--batch_size`` prompts per request: keep this at least that large). Each prompt still takes ``n`` queue
    slots, so ``limits.max_queue`` must hold a whole request for it to be admitted."""
    max_stop: int = Field(default=16, ge=1)
    """Most stop sequences per request (OpenAI allows 4; harnesses send their task's stops plus EOS)."""
    max_stop_chars: int = Field(default=512, ge=1)
    """Longest stop sequence, in characters (the engine scans for stops at every token)."""
    max_json_depth: int = Field(default=32, ge=4)
    """Deepest nesting of a request body's JSON; deeper bodies get 400."""
    max_body_bytes: int = Field(default=4_000_000, ge=1024)
    """Largest request body; bigger ones get 413."""


class AuthConfig(R1Config):
    """Optional bearer-token auth (``Authorization: Bearer <key>``). Off when no key is found."""

    api_key_env: str | None = "R1RAY_API_KEY"
    """Environment variable (read in each replica) holding the API key. On a cluster set it on the workers
    (e.g. a Kubernetes secret); with the embedded local Ray the job's environment is inherited."""
    api_key: SecretStr | None = None
    """The API key itself (prefer ``api_key_env``: a key in a YAML file ends up in the Serve config). Wins over
    the environment variable. Never logged."""

    def resolve(self) -> str | None:
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class VariantConfig(R1Config):
    """One model of an A/B application: its own Serve deployment (replicas, engine), reachable by its name as
    the model id, and a share ``weight`` of the traffic sent to a split alias."""

    model_path: str | None = None
    """Hugging Face model directory of this variant. Unset: the newest export of ``run_name``."""
    run_name: str | None = None
    """Run (under ``<storage.root>/runs``) whose newest export this variant serves when ``model_path`` is unset."""
    weight: float = Field(default=1.0, ge=0)
    """Share of the traffic sent to an alias (``aliases``), relative to the other variants' weights (90 and 10
    is a 90/10 split). 0: reachable by name only."""
    engine: dict[str, Any] = Field(default_factory=dict)
    """Fields of ``engine`` that differ for this variant (e.g. ``{max_batch_size: 32}``); the rest come from the
    top-level ``engine``."""
    deployment: dict[str, Any] = Field(default_factory=dict)
    """Fields of ``deployment`` that differ for this variant (e.g. ``{num_replicas: 3}``); the rest come from the
    top-level ``deployment``."""


class RouterConfig(R1Config):
    """The thin ingress in front of the variants of an A/B application (used only when ``variants`` is set)."""

    num_replicas: int = Field(default=1, ge=1)
    """Router replicas (each holds no model; one is plenty below a few thousand requests/s)."""
    num_cpus: float = Field(default=0.1, ge=0)
    """Logical CPUs reserved per router replica."""
    sticky_header: str = "X-User-Id"
    """Request header naming the client; with it (or OpenAI's ``user`` field) a request sent to an alias always
    lands on the same variant while the weights stay the same."""
    forward_timeout_s: float = Field(default=600.0, gt=0)
    """Longest a request may wait for its variant's answer to start (the whole answer, when not streamed; Serve
    holds a request while a variant has no replica up); past it the router answers 503."""


class ServeConfig(JobConfig):
    """Serve a Hugging Face model directory over an OpenAI-compatible HTTP API with Ray Serve.

    With no arguments: the newest export of the default pretraining run (trained first when there is none),
    on http://127.0.0.1:8000.
    """

    seed: int = 0
    """Seed of the default pretraining run (when one is trained first) and of unseeded sampling."""
    model_path: str | None = None
    """Hugging Face model directory to serve (weights + tokenizer). Unset: the newest export of the pretraining
    run ``<storage.root>/runs/<run_name>``."""
    run_name: str = "default"
    """Pretraining run whose newest export is served when ``model_path`` is unset."""
    train_if_missing: bool = True
    """When ``model_path`` is unset and the run has no export yet, train the default pretraining run first."""
    model_name: str | None = None
    """Model id in ``/v1/models`` and in requests; unset: the model directory's name."""
    variants: dict[str, VariantConfig] = Field(default_factory=dict)
    """A/B serving: several models in one application, ``{name: {model_path, weight, engine, deployment}}``.
    Each name is a model id that reaches its variant; an alias (``aliases``) splits traffic by weight. Unset:
    one model (``model_path``). With variants, ``model_path``/``model_name`` stay unset."""
    aliases: list[str] = Field(default_factory=list)
    """Extra model ids. With ``variants``: each alias routes a request to a variant drawn by weight (sticky per
    client that sends ``router.sticky_header`` or ``user``); a request without ``model`` (``/tokenize``) goes to the
    first alias.
    Without variants: other names of the one model."""
    router: RouterConfig = RouterConfig()
    """The A/B router (only with ``variants``)."""
    app_name: str = "r1ray"
    """Serve application name."""
    blocking: bool = True
    """Keep the job in the foreground serving until Ctrl-C; false: deploy, print the URL and return."""
    http: HttpConfig = HttpConfig()
    """HTTP proxy."""
    deployment: DeploymentConfig = DeploymentConfig()
    """Replicas, autoscaling and resources."""
    engine: EngineConfig = EngineConfig()
    """Generation engine."""
    limits: LimitsConfig = LimitsConfig()
    """Admission control and request bounds."""
    reasoning: ReasoningConfig = ReasoningConfig()
    """Thinking budgets of ``reasoning_effort``."""
    auth: AuthConfig = AuthConfig()
    """API-key auth."""

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.engine.backend == "vllm" and self.deployment.num_gpus <= 0:
            raise ValueError(
                "engine.backend=vllm needs a GPU per replica: set deployment.num_gpus=1 (or engine.backend=hf)"
            )
        if self.engine.device == "cuda" and self.deployment.num_gpus <= 0:
            raise ValueError("engine.device=cuda needs deployment.num_gpus > 0 (or engine.device=auto/cpu)")
        if self.limits.max_queue < self.engine.max_batch_size:
            raise ValueError(
                f"limits.max_queue ({self.limits.max_queue}) < engine.max_batch_size ({self.engine.max_batch_size}): "
                "a batch could never fill; raise limits.max_queue"
            )
        names = [self.model_name] if self.model_name else []
        for alias in self.aliases:
            if not _NAME.fullmatch(alias):
                raise ValueError(f"aliases: {alias!r} is not a valid model id (letters, digits, '.', '_', '-'; "
                                 "at most 64 characters)")
        if len(set(self.aliases)) != len(self.aliases):
            raise ValueError(f"aliases: each alias once, got {self.aliases}")
        if self.variants:
            self._check_variants()
        elif set(names) & set(self.aliases):
            raise ValueError(f"aliases: {names[0]!r} is already the model_name")
        return self

    def _check_variants(self) -> None:
        problems = []
        for field in ("model_path", "model_name"):
            if getattr(self, field) is not None:
                problems.append(f"{field}: leave it unset with variants (each variant names its own model_path; "
                                "its model id is its name)")
        for name, v in self.variants.items():
            where = f"variants.{name}"
            if not _NAME.fullmatch(name):
                problems.append(f"{where}: {name!r} is not a valid model id (letters, digits, '.', '_', '-'; "
                                "at most 64 characters)")
            if v.model_path is None and v.run_name is None:
                problems.append(f"{where}: set model_path (an export directory) or run_name (a run whose newest "
                                "export it serves)")
                continue
            try:
                self.variant_config(name)
            except ValidationError as e:
                for err in e.errors():
                    loc = ".".join(str(p) for p in err["loc"])
                    problems.append(f"{where}: {loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}")
        clash = set(self.aliases) & set(self.variants)
        if clash:
            problems.append(f"aliases: {sorted(clash)} already name variants; an alias needs its own name")
        if self.aliases and not any(v.weight > 0 for v in self.variants.values()):
            problems.append("variants: every weight is 0, so an alias has nowhere to send traffic; give at least "
                            "one variant a weight > 0")
        if problems:
            raise ValueError("; ".join(problems))

    def variant_config(self, name: str) -> ServeConfig:
        """The single-model config of variant ``name``: its model, its id (the name), the top-level settings
        with its ``engine``/``deployment`` overrides, and the aliases (a variant answers to them too)."""
        v = self.variants[name]
        return ServeConfig.model_validate({
            **self.model_dump(), "model_path": v.model_path, "model_name": name,
            "run_name": v.run_name or self.run_name, "variants": {},
            "engine": {**self.engine.model_dump(), **v.engine},
            "deployment": {**self.deployment.model_dump(), **v.deployment},
        })

    def split(self) -> dict[str, float]:
        """Variant -> share of an alias's traffic (weights normalised; variants of weight 0 left out)."""
        total = sum(v.weight for v in self.variants.values())
        return {n: v.weight / total for n, v in self.variants.items() if v.weight > 0} if total else {}

    def max_ongoing_requests(self) -> int:
        """Serve's per-replica cap: above our own queue bound, so r1ray (not Serve) answers 429 when full."""
        return self.limits.max_queue + 16
