"""OpenAI API request and response models (the subset r1ray serves), pydantic only.

Requests are strict about types (a string where a number belongs is a 400 naming the field) and ignore
unknown fields, as OpenAI's API does, so clients that send extra options keep working. Options that change
sampling but that the engine cannot honour (``logit_bias``, penalties, ``best_of`` above ``n``) are refused
with a 400 naming them rather than silently ignored; numbers are range-checked here, so nothing out of what
the engine can represent reaches it.
"""

from __future__ import annotations

import json
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

from r1ray.infer.types import Guidance

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


Number = StrictFloat | StrictInt


class StreamOptions(_Req):
    include_usage: StrictBool = False


class JSONSchemaFormat(_Req):
    name: StrictStr = Field(default="response", max_length=64)
    description: StrictStr | None = None
    schema_: dict[str, Any] | StrictBool | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None
    """Accepted; the schema is enforced either way (constrained decoding)."""


class ResponseFormat(_Req):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _need_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format: type json_schema needs json_schema.schema")
        return self


class StructuredOutputs(_Req):
    """vLLM's ``structured_outputs`` request field: exactly one of ``json``, ``regex``, ``choice``, ``grammar``,
    ``json_object``."""

    json_: dict[str, Any] | StrictStr | StrictBool | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = Field(default=None, min_length=1)
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            names = ", ".join(g.rstrip("_") for g in given) or "none"
            raise ValueError(f"structured_outputs: give exactly one of json, regex, choice, grammar, json_object "
                             f"(got {names})")
        return self


EFFORTS = ("none", "minimal", "low", "medium", "high")


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
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    """vLLM's older names of ``structured_outputs`` (``guided_json``, ``guided_regex``, ``guided_choice``,
    ``guided_grammar``), still sent by many clients."""
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = Field(default=None, min_length=1)
    guided_grammar: StrictStr | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    """A thinking budget by name (``reasoning.effort_budgets`` of the server config)."""
    thinking_token_budget: StrictInt | None = Field(default=None, ge=0)
    """At most this many thinking tokens; then the server writes ``</think>`` and the model answers."""

    def guidance(self) -> tuple[Guidance | None, str | None]:
        """The constraint this request asks for and the field that asked (for error messages)."""
        found: list[tuple[Guidance, str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append((Guidance("json_object"), "response_format"))
        elif rf is not None and rf.type == "json_schema":
            found.append((Guidance("json_schema", _schema_text(rf.json_schema.schema_)), "response_format"))
        so = self.structured_outputs
        if so is not None:  # exactly one of its fields is set (json_object: none of these)
            values = (so.json_, so.regex, so.choice, so.grammar)
            given = [(k, v) for k, v in zip(_GUIDE_KINDS, values, strict=True) if v is not None]
            found.append((_guide(*given[0]) if given else Guidance("json_object"), "structured_outputs"))
        guided = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
        for kind, name in zip(_GUIDE_KINDS, guided, strict=True):
            if (value := getattr(self, name)) is not None:
                found.append((_guide(kind, value), name))
        return found[0] if found else (None, None)

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
        asked = [f for f in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            asked.insert(0, "response_format")
        if len(asked) > 1:
            raise ValueError(f"{asked[1]}: only one output constraint per request (also got {asked[0]})")
        if self.seed is not None and self.seed + self.n - 1 > INT64_MAX:
            raise ValueError(f"seed: seed + n - 1 must be at most 2**63 - 1 (choice k samples with seed + k), "
                             f"got seed={self.seed}, n={self.n}")
        return self


def _schema_text(schema: Any) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


_GUIDE_KINDS = ("json_schema", "regex", "choice", "grammar")
"""The guidance kinds of the constraint fields, in order: ``structured_outputs.json``/``regex``/``choice``/``grammar``
and vLLM's older ``guided_json``/``guided_regex``/``guided_choice``/``guided_grammar``."""


def _guide(kind: str, value: Any) -> Guidance:
    """The ``Guidance`` one constraint field's ``value`` asks for."""
    if kind == "json_schema":
        return Guidance("json_schema", _schema_text(value))
    if kind == "choice":
        return Guidance("choice", choices=tuple(value))
    return Guidance(kind, value)


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


class ToolCallFunction(_Req):
    name: StrictStr
    arguments: StrictStr
    """The call's arguments as a JSON text (OpenAI's shape)."""


class ToolCall(_Req):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class FunctionDef(_Req):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Req):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Req):
    name: StrictStr


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict[str, Any]] | None = None
    reasoning_content: StrictStr | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls (sent back with the ``tool`` messages that answer them)."""
    tool_call_id: StrictStr | None = None

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
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """Default: ``auto`` with tools, ``none`` without."""
    parallel_tool_calls: StrictBool = True

    @model_validator(mode="after")
    def _tools(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or []]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tools: function names must be unique, {dup[0]!r} appears twice")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise ValueError("tool_choice: needs tools (none were given)")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {choice.function.name!r} (tools: {', '.join(names)})")
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and self.guidance()[0] is not None:
            raise ValueError("tool_choice: a forced tool call cannot be combined with response_format or "
                             "structured_outputs")
        return self

    def tool_mode(self) -> str:
        """``none``, ``auto``, ``required`` or ``named``."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


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


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


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


class _Response(BaseModel):
    """What every completion answer starts with, whole or streamed (``object`` names which it is)."""

    id: str
    object: str
    created: int
    model: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
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
    reasoning: str | None = None
    """The same text as ``reasoning_content`` (vLLM's newer name; both are sent)."""
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(AssistantMessage):
    # a streamed piece of the assistant's message: the same fields, and `role` only in the first piece
    role: Literal["assistant"] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
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
