"""OpenAI API request and response models (the subset r1ray serves), pydantic only.

Requests are strict about types (a string where a number belongs is a 400 naming the field) and ignore
unknown fields, as OpenAI's API does, so clients that send extra options keep working. Options that change
sampling but that the engine cannot honour (``logit_bias``, penalties, ``best_of`` above ``n``) are refused
with a 400 naming them rather than silently ignored; numbers are range-checked here, so nothing out of what
the engine can represent reaches it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


Number = StrictFloat | StrictInt


class StreamOptions(_Req):
    include_usage: StrictBool = False


class _Sampling(_Req):
    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: Number = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt = Field(default=0, ge=0)
    """Not in OpenAI's API (vLLM's extension); 0 is off."""
    ignore_eos: StrictBool = False
    """vLLM's extension: generate exactly max_tokens tokens (for load tests)."""
    n: StrictInt = Field(default=1, ge=1)
    best_of: StrictInt | None = Field(default=None, ge=1)
    """Only ``best_of == n`` (or unset) is served: ranking extra samples is not implemented."""
    stop: StrictStr | list[StrictStr] | None = None
    """How many and how long: ``limits.max_stop`` / ``limits.max_stop_chars`` (checked by the app)."""
    seed: StrictInt | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    """A 64-bit integer; choice k of n samples with ``seed + k``, which must stay 64-bit too."""
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    """Validated as OpenAI does (token ids -> [-100, 100]); any non-zero bias is refused (not implemented)."""
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, x in (v or {}).items():
            if not k.isdigit() or len(k) > 12:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {k[:40]!r}")
            if not -100 <= x <= 100:
                raise ValueError(f"bias of token {k} must be in [-100, 100], got {x}")
        if v and any(x != 0 for x in v.values()):
            raise ValueError("a non-zero logit_bias is not supported by this server")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: a non-zero value is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of == n ({self.n}) is supported, got {self.best_of}")
        if self.seed is not None and self.seed + self.n - 1 > INT64_MAX:
            raise ValueError(f"seed: seed + n - 1 must be at most 2**63 - 1 (choice k samples with seed + k), "
                             f"got seed={self.seed}, n={self.n}")
        return self


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    """0 only with ``echo`` (score the prompt: its logprobs, nothing generated)."""
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False
    suffix: StrictStr | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("suffix (insertion) is not supported by this server")
        return None


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict[str, Any]] | None = None
    reasoning_content: StrictStr | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class TokenizeCompletionRequest(_Req):
    """vLLM's ``POST /tokenize`` with a prompt."""

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Req):
    """vLLM's ``POST /detokenize``."""

    model: StrictStr | None = None
    tokens: list[StrictInt]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class TokenizeChatRequest(_Req):
    """vLLM's ``POST /tokenize`` with chat messages (rendered by the chat template, then tokenized)."""

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool = False


# ------------------------------------------------------------------ responses (plain dicts are built from these)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class TokenizerInfo(BaseModel):
    """vLLM's ``GET /tokenizer_info`` (what lm-eval's ``tokenizer_backend=remote`` reads)."""

    tokenizer_class: str
    model_max_length: int
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    vocab_size: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "r1ray"
    root: str | None = None
    max_model_len: int | None = None
    split: dict[str, float] | None = None
    """An A/B alias: the share of its traffic each variant gets."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
