"""The types every engine speaks: sampling parameters, streamed step events, finished completions, and the
``Engine`` protocol that the HF engine, the vLLM engine and the engine pool's actors implement.

No torch, no Ray: serving, evaluation and GRPO rollouts import these without pulling in a backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field  # noqa: F401
from typing import Any, Protocol, runtime_checkable


class EngineFullError(RuntimeError):
    """The engine holds ``max_queue`` sequences already; the caller should retry later (HTTP 429)."""


GUIDANCE_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice", "tool_call")


@dataclass(frozen=True)
class Guidance:
    """Constrained decoding of a reply's answer (``r1ray.infer.guided`` enforces it with xgrammar).

    ``kind`` is one of ``GUIDANCE_KINDS``: ``json_schema`` (``spec`` is the schema as JSON text), ``json_object``
    (any JSON object; ``spec`` unused), ``regex``, ``grammar`` (EBNF in xgrammar's GBNF dialect) or ``choice``
    (``choices``: the reply is exactly one of them) or ``tool_call`` (``spec``: a JSON list of ``{name, parameters}``;
    the reply is one ``<tool_call>`` block calling one of them with valid arguments). A reply that opens ``<think>`` thinks freely; the constraint
    holds from the token after ``</think>`` (or from the first token when the reply does not think)."""

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` are off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0 = only the sampled one)."""
    processed_logprobs: bool = False
    """The logprobs of the distribution sampled from (the logits divided by ``temperature``), not the model's
    raw one: what importance sampling needs (vLLM's ``logprobs_mode="processed_logprobs"``). Top-k/top-p
    truncation is not reflected (rollouts that use TIS sample without it)."""
    prompt_logprobs: bool = False
    """Also return the logprobs of the prompt tokens (completions ``echo`` + ``logprobs``)."""
    ignore_eos: bool = False
    """Keep generating past EOS / ``<|im_end|>`` until max_tokens (benchmarks; vLLM's option of that name)."""
    guidance: Guidance | None = None
    """Constrain the answer (after any thinking) to a JSON schema, a regex, a grammar or a choice."""
    thinking_budget: int | None = None
    """At most this many tokens of thinking (``<think>`` included): once spent, the engine writes ``</think>``
    itself and the model answers."""
    starts_in_thinking: bool = False
    """The prompt already opened ``<think>`` (a template that prefills it): the reply starts in its reasoning."""


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class StepEvent:
    """One step of one sequence: a text delta (may be empty while a stop string is undecided) and its token."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    """``stop`` (EOS or a stop string), ``length`` (max_tokens) or ``cancelled``; None while running."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """On the first event only, when ``prompt_logprobs`` was asked for."""
    first: bool = False


@dataclass
class Completion:
    """A finished sequence, as ``generate`` returns it."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None
    ttft_s: float
    latency_s: float



@runtime_checkable
class Engine(Protocol):
    """What a generation backend offers. ``HFEngine`` (CPU or GPU, continuous batching) and ``VLLMEngine``
    (GPU) implement it; ``r1ray.infer.pool.EnginePool`` runs engines as Ray actors behind the same calls.

    - ``generate``: blocking, batched; the in-process API of evaluation and rollouts.
    - ``stream``: async events of one sequence (the Serve app); closing the iterator cancels it.
    - ``update_weights``: load named tensors into the running model in place (GRPO's weight sync), tagged
      with a version so a caller can tell which policy produced a completion.
    - ``load``: running/waiting counts (admission control).
    """

    backend: str
    tokenizer: Any
    max_model_len: int
    weights_version: int

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]: ...

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[StepEvent]: ...

    def update_weights(self, named_tensors: Mapping[str, Any], version: int) -> None: ...

    def encode(self, text: str) -> list[int]: ...

    def load(self) -> dict[str, int]: ...

    def reserve(self, n: int) -> None: ...

    def shutdown(self) -> None: ...


OnBatch = Callable[[int, int, float], None]
"""``on_batch(sequences, tokens, seconds)``: called by an engine after each scheduler step (metrics)."""
