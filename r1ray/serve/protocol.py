"""HTTP plumbing shared by the one-model app (``r1ray.serve.app``) and the A/B router (``r1ray.serve.ab``):
the routes, OpenAI's error shape, the JSON body checks, bearer auth, the capped body read, and the request a
router forwards to a variant through a deployment handle."""

import hmac
import json
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse

from r1ray.serve import schemas as S

ROUTE_COMPLETIONS = "/v1/completions"
ROUTE_CHAT = "/v1/chat/completions"
ROUTE_MODELS = "/v1/models"
ROUTE_MODEL = "/v1/models/{model_id:path}"
ROUTE_TOKENIZE = "/tokenize"
ROUTE_DETOKENIZE = "/detokenize"
ROUTE_TOKENIZER_INFO = "/tokenizer_info"
INT64_MAX = 2**63 - 1
ROUTE_HEALTH = "/health"
class APIError(Exception):
    """An error answered with OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = S.ErrorResponse(error=S.ErrorBody(message=self.message, type=self.type, param=self.param,
                                                 code=self.code or str(self.status)))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:32]} is out of range (numbers must be finite)")
    return x


def _json_depth_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` nests deeper than ``limit`` (iterative: a deep body must not exhaust the stack)."""
    stack = [(data, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict | list):
            if d > limit:
                return True
            stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return False


def parse_json_body(body: bytes, max_depth: int) -> dict:
    """The JSON object in ``body``, or an ``APIError`` 400 naming what is wrong: invalid UTF-8, invalid JSON,
    ``NaN``/``Infinity`` or out-of-range numbers, integers too long to convert, nesting deeper than
    ``max_depth`` (``limits.max_json_depth``), a non-object, or an unpaired surrogate escape."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (invalid byte at position {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise APIError(400, f"request body nests too deeply (limits.max_json_depth is {max_depth})") from None
    except ValueError as e:  # NaN/Infinity, 1e999, or an integer beyond Python's digit limit
        raise APIError(400, f"request body has an invalid number: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    if _json_depth_exceeds(data, max_depth):
        raise APIError(400, f"request body nests deeper than {max_depth} levels (limits.max_json_depth)")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "request contains invalid Unicode (an unpaired surrogate escape)") from None
    return data


def check_auth(api_key: str | None, headers: Any) -> None:
    """401 unless ``headers`` carry ``Authorization: Bearer <api_key>`` (no-op when auth is off)."""
    if not api_key:
        return
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (``limits.max_body_bytes``;
    never buffered whole past the limit)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds limits.max_body_bytes ({limit} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds limits.max_body_bytes ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class ForwardedRequest:
    """The parts of a request the route handlers read (headers, body stream), for a request the A/B router
    hands to a variant through a deployment handle instead of over HTTP."""

    def __init__(self, headers: dict[str, str], body: bytes):
        self.headers = {k.lower(): v for k, v in headers.items()}
        self._body = body

    async def stream(self) -> AsyncIterator[bytes]:
        yield self._body
