"""The Ray Serve application: a FastAPI ingress deployment speaking OpenAI's API over an r1ray engine.

Routes: ``GET /health`` (no auth: for probes), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` → server-sent events for both), and
vLLM's ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (what evaluation harnesses use).

The HTTP layer owns validation, auth, admission control (429 + Retry-After when the replica holds
``limits.max_queue`` sequences), metrics and the OpenAI response shapes; the engine owns batching and sampling.
The replica loads its model in a background thread: until it is ready every route but ``/health`` answers 503
with ``Retry-After`` at once (``/health`` answers 503 too, with ``status: loading``), instead of holding the
request. A malformed request of any kind is a 4xx naming the problem; a request the engine fails on is a 500
for that request alone.

``build_app(args)`` is the application builder a Serve config file or a KubeRay RayService points at::

    import_path: r1ray.serve.app:build_app
    args: {model_path: /models/r1, deployment: {autoscaling: {min_replicas: 1, max_replicas: 4}}}

``args`` are ``ServeConfig`` fields (ray/storage/logging are ignored here; ``http`` is the proxy's business).
"""


import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from r1ray.infer import EngineFullError, SamplingParams, StepEvent, make_engine
from r1ray.infer.text import ReasoningStream, count_reasoning_tokens, prompt_opens_think, split_reasoning
from r1ray.model.tokenizer import CHAT_TEMPLATE, END_THINK, THINK, token_id
from r1ray.observe.log import get_logger, setup_logging
from r1ray.observe.metrics import record
from r1ray.serve import schemas as S
from r1ray.serve.ab import ROUTER_MAX_ONGOING, ABRouter
from r1ray.serve.config import ServeConfig
from r1ray.serve.protocol import (  # noqa: F401 - re-exported: tests and users import them from here
    INT64_MAX,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_DETOKENIZE,
    ROUTE_HEALTH,
    ROUTE_MODEL,
    ROUTE_MODELS,
    ROUTE_TOKENIZE,
    ROUTE_TOKENIZER_INFO,
    APIError,
    ForwardedRequest,
    check_auth,
    parse_json_body,
    read_body,
)
from r1ray.serve.tools import ToolCallStream, parse_tool_calls
from r1ray.serve.tools import forced_guidance as forced_tool_guidance
from r1ray.serve.tools import render_prompt as render_tool_prompt

log = get_logger(__name__)

# Routes the A/B router hands to a variant (method, path) -> OpenAIServer method; the router answers
# /v1/models itself.
_FORWARDED = {("POST", ROUTE_COMPLETIONS): "completions", ("POST", ROUTE_CHAT): "chat",
              ("POST", ROUTE_TOKENIZE): "tokenize", ("POST", ROUTE_DETOKENIZE): "detokenize",
              ("GET", ROUTE_TOKENIZER_INFO): "tokenizer_info", ("GET", ROUTE_HEALTH): "health"}


def _describe_validation(e: ValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        # Unions report one error per member; name the field once with the first message.
        base = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in (
            "str", "int", "float", "list", "dict"))))
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a cross-field check: its message starts with the field it names
            loc, base = "", msg.split(":", 1)[0]
            msg = msg.split(":", 1)[-1].strip()
        first = first or base or loc
        line = f"{base or loc}: {msg}"
        if err["type"] == "missing":
            line = f"{base or loc}: required field is missing"
        if line not in parts:
            parts.append(line)
    return "invalid request: " + "; ".join(parts[:6]), first


def _sse(obj: Any) -> bytes:
    data = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n".encode()


def _coalesce(items: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Merge consecutive events of the same sequence (text, tokens, logprobs); errors pass through as they are."""
    out: list[tuple[int, Any]] = []
    pos: dict[int, int] = {}
    for i, ev in items:
        j = pos.get(i)
        if isinstance(ev, BaseException) or j is None or isinstance(out[j][1], BaseException) \
                or out[j][1].finish_reason is not None:
            pos[i] = len(out)
            out.append((i, ev))
            continue
        prev = out[j][1]
        out[j] = (i, StepEvent(prev.text + ev.text, prev.token_ids + ev.token_ids, prev.logprobs + ev.logprobs,
                               finish_reason=ev.finish_reason, prompt_logprobs=prev.prompt_logprobs,
                               first=prev.first))
    return out


fastapi_app = FastAPI(title="r1ray", description="OpenAI-compatible API over r1ray models", docs_url=None,
                      redoc_url=None)


class OpenAIModel:
    """One replica: an engine plus the OpenAI HTTP layer. Deployed as the app's FastAPI ingress
    (``OpenAIServer``), or, as a variant of an A/B app, as a plain deployment the router calls through ``forward``
    (Serve allows one FastAPI ingress per application; the route methods are plain methods either way)."""

    def __init__(self, cfg: dict[str, Any], variant: bool = False):
        self.cfg = ServeConfig.model_validate(cfg)
        setup_logging(self.cfg.logging.level)
        self.model_path = str(self.cfg.model_path)
        self.model_name = self.cfg.model_name or Path(self.model_path).name
        self._tok_window = [time.perf_counter(), 0]
        self._hits_seen = 0
        self.api_key = self.cfg.auth.resolve()
        # A one-model app is its own single variant, named after its model.
        self.tags = {"model": self.model_name, "variant": self.model_name}
        self.engine: Any = None
        self.tokenizer: Any = None
        self.vocab_size = 0
        self._load_error: str | None = None
        if variant:
            # Behind the A/B router: load before __init__ returns, so Serve counts the replica as started only
            # once it can answer. A redeploy (max_surge_percent) then keeps the old replica serving until the
            # new one has its model: no request meets a loading replica. The router answers while it waits.
            self._load()
            if self._load_error is not None:
                raise RuntimeError(f"variant {self.model_name!r}: model failed to load: {self._load_error}")
            return
        # Load in the background: Serve routes requests to the replica once __init__ returns, and each route
        # answers 503 + Retry-After while the model loads instead of holding the request.
        self._loader = threading.Thread(target=self._load, name="r1ray-model-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        e = self.cfg.engine
        threads = e.torch_threads or max(1, int(-(-self.cfg.deployment.num_cpus // 1)))
        t0 = time.perf_counter()
        try:
            engine = make_engine(
                self.model_path, backend=e.backend, device=e.device, dtype=e.dtype, torch_threads=threads,
                max_batch_size=e.max_batch_size, batch_wait_timeout_s=e.batch_wait_timeout_s,
                max_queue=self.cfg.limits.max_queue, max_model_len=e.max_model_len, seed=self.cfg.seed,
                on_batch=self._on_batch, prefix_cache_mb=e.prefix_cache_mb, prefix_block_tokens=e.prefix_block_tokens,
            )
            engine.start()
        except Exception as err:  # answered as 503 with the reason, and Serve's health check restarts us
            log.exception("loading %s failed", self.model_path)
            self._load_error = f"{type(err).__name__}: {err}"
            return
        self.tokenizer = engine.tokenizer
        self.vocab_size = len(self.tokenizer)
        self._think_ids = tuple(token_id(self.tokenizer, t) for t in (THINK, END_THINK))
        self.engine = engine  # set last: routes treat a non-None engine as ready
        log.info("serving %s as %r in %.1f s (engine=%s, max_batch_size=%d, max_queue=%d, context=%d, auth=%s)",
                 self.model_path, self.model_name, time.perf_counter() - t0, engine.backend, e.max_batch_size,
                 self.cfg.limits.max_queue, engine.max_model_len, "on" if self.api_key else "off")

    async def check_health(self) -> None:
        """Serve's replica health check: a replica whose model failed to load is replaced."""
        if self._load_error is not None:
            raise RuntimeError(f"model failed to load: {self._load_error}")

    def _ready(self) -> None:
        if self.engine is not None:
            return
        retry = str(self.cfg.limits.retry_after_s)
        if self._load_error is not None:
            raise APIError(503, f"model {self.model_name!r} failed to load ({self._load_error}); the replica will "
                                "be restarted", type="server_error", code="model_load_failed",
                           headers={"Retry-After": retry})
        raise APIError(503, f"model {self.model_name!r} is loading; retry after {retry} s", type="server_error",
                       code="model_loading", headers={"Retry-After": retry})

    # ------------------------------------------------------------------ plumbing
    def _on_batch(self, rows: int, tokens: int, seconds: float) -> None:
        record("r1ray_serve_batch_size", rows, **self.tags)
        w = self._tok_window
        w[1] += tokens
        now = time.perf_counter()
        if now - w[0] >= 1.0:
            record("r1ray_serve_tokens_per_second", w[1] / (now - w[0]), **self.tags)
            record("r1ray_serve_queue_depth", self.engine.load()["waiting"], **self.tags)
            self._record_prefix_cache()
            w[0], w[1] = now, 0
        record("r1ray_serve_tokens_generated", tokens, **self.tags)

    def _record_prefix_cache(self) -> None:
        stats = getattr(self.engine, "prefix_stats", None)
        if not stats or not stats["prefill_tokens"]:
            return
        reused = stats["cached_tokens"] + stats["shared_tokens"]
        record("r1ray_serve_prefix_reused_ratio", reused / stats["prefill_tokens"], **self.tags)
        cache = self.engine.prefix_cache
        if cache is not None:
            record("r1ray_serve_prefix_cache_hits", cache.hits - self._hits_seen, **self.tags)
            self._hits_seen = cache.hits
            record("r1ray_serve_prefix_cache_bytes", cache.bytes, **self.tags)

    def _done(self, route: str, status: int, t0: float) -> None:
        record("r1ray_serve_requests", 1, route=route, status=str(status), **self.tags)
        record("r1ray_serve_latency_seconds", time.perf_counter() - t0, route=route, **self.tags)

    def _auth(self, request: Request) -> None:
        check_auth(self.api_key, request.headers)

    async def _body(self, request: Request) -> bytes:
        return await read_body(request, self.cfg.limits.max_body_bytes)

    async def _json(self, request: Request) -> dict:
        return parse_json_body(await self._body(request), self.cfg.limits.max_json_depth)

    def _validated(self, data: dict, cls: type[S._Req]) -> Any:
        """``data`` as a ``cls`` request for this replica's model (else a 400 naming the field or the model)."""
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            msg, param = _describe_validation(e)
            raise APIError(400, msg, param=param) from None
        self._check_model(req.model)
        return req

    async def _parse(self, request: Request, cls: type[S._Req]) -> Any:
        req = self._validated(await self._json(request), cls)
        lim = self.cfg.limits
        if getattr(req, "n", 1) > lim.max_n:
            raise APIError(400, f"n: at most {lim.max_n} choices per prompt (limits.max_n), got {req.n}", param="n")
        stops = getattr(req, "stop", None) or []
        if len(stops) > lim.max_stop:
            raise APIError(400, f"stop: at most {lim.max_stop} stop sequences (limits.max_stop), got {len(stops)}",
                           param="stop")
        if any(len(x) > lim.max_stop_chars for x in stops):
            raise APIError(400, f"stop: each stop sequence may have at most {lim.max_stop_chars} characters "
                                "(limits.max_stop_chars)", param="stop")
        return req

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name and model not in self.cfg.aliases:
            names = ", ".join(repr(n) for n in (self.model_name, *self.cfg.aliases))
            raise APIError(404, f"model {model!r} does not exist; this server serves {names}",
                           param="model", code="model_not_found")

    def _check_context(self, prompt_len: int, max_tokens: int | None, default: int, *, echo: bool = False) -> int:
        ctx = self.engine.max_model_len
        if max_tokens == 0 and not echo:
            raise APIError(400, "max_tokens: must be at least 1 (0 only with echo=true, to score the prompt)",
                           param="max_tokens")
        if prompt_len == 0:
            raise APIError(400, "prompt is empty: give at least one token", param="prompt")
        if prompt_len > ctx or (prompt_len == ctx and max_tokens != 0):
            raise APIError(400, f"prompt is {prompt_len} tokens; this model's maximum context length is {ctx} "
                                "tokens (prompt + max_tokens)", param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            return min(default, ctx - prompt_len)
        if prompt_len + max_tokens > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens; you asked for "
                                f"{prompt_len + max_tokens} ({prompt_len} in the prompt + {max_tokens} max_tokens): "
                                f"lower max_tokens to at most {ctx - prompt_len}", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def _busy(self, e: EngineFullError) -> APIError:
        return APIError(429, f"server busy: {e}; retry after {self.cfg.limits.retry_after_s} s",
                        type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(self.cfg.limits.retry_after_s)})

    def _reserve(self, n: int) -> None:
        try:
            self.engine.reserve(n)
        except EngineFullError as e:
            raise self._busy(e) from None

    async def _handle(self, route: str, request: Request, fn) -> Response:
        t0 = time.perf_counter()
        try:
            self._auth(request)
            self._ready()
            resp = await fn(request, t0)
        except APIError as e:
            self._done(route, e.status, t0)
            return e.response()
        except asyncio.CancelledError:
            self._done(route, 499, t0)
            raise
        except Exception as e:  # a bug must answer 500 with a message and leave the server up
            log.exception("%s failed", route)
            self._done(route, 500, t0)
            return APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()
        if not isinstance(resp, StreamingResponse):
            self._done(route, resp.status_code, t0)
        return resp

    def _stream(self, route: str, t0: float, events: AsyncIterator[bytes]) -> StreamingResponse:
        """Server-sent events around a request's ``events``: ``[DONE]`` after the last one, an error event
        if an ``APIError`` comes mid-stream (the status line is already sent), 499 when the client goes
        away, and the request's metrics recorded once whichever way it ends."""
        async def gen() -> AsyncIterator[bytes]:
            status = 200
            try:
                async for b in events:
                    yield b
                yield b"data: [DONE]\n\n"
            except APIError as e:
                status = e.status
                yield _sse(S.ErrorResponse(error=S.ErrorBody(message=e.message, type=e.type, code=str(e.status))))
            except asyncio.CancelledError:
                status = 499
                raise
            finally:
                await events.aclose()  # frees the engine slots now if the client left mid-stream
                self._done(route, status, t0)

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def _run_choices(self, jobs: list[tuple[int, list[int], SamplingParams]], t0: float, route: str,
                           ) -> AsyncIterator[tuple[int, StepEvent]]:
        """Run every (index, prompt ids, params) sequence; yield (index, event) as they come."""
        q: asyncio.Queue[tuple[int, StepEvent | BaseException]] = asyncio.Queue()
        first = [True]

        async def one(i: int, ids: list[int], p: SamplingParams) -> None:
            try:
                async for ev in self.engine.stream(ids, p):
                    if first[0] and ev.token_ids:
                        first[0] = False
                        record("r1ray_serve_ttft_seconds", time.perf_counter() - t0, route=route, **self.tags)
                    await q.put((i, ev))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await q.put((i, e))

        tasks = [asyncio.create_task(one(*job)) for job in jobs]
        try:
            left = len(jobs)
            while left:
                items = [await q.get()]
                while not q.empty():  # the client fell behind: send what is ready as one event per sequence
                    items.append(q.get_nowait())
                for i, ev in _coalesce(items):
                    if isinstance(ev, BaseException):
                        if isinstance(ev, EngineFullError):
                            raise self._busy(ev)
                        if isinstance(ev, ValueError):
                            raise APIError(400, str(ev))
                        raise ev
                    if ev.finish_reason == "error":
                        raise APIError(500, "the engine failed on this request (see the replica log); other "
                                            "requests are not affected", type="server_error", code="engine_error")
                    yield i, ev
                    if ev.finish_reason is not None:
                        left -= 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ routes
    def status(self) -> dict[str, Any]:
        """``/health``'s body: ``status`` ok / loading / error, the model, the replica, and the engine's load."""
        replica = serve.get_replica_context().replica_id.unique_id
        if self.engine is None:
            return {"status": "error" if self._load_error else "loading", "model": self.model_name,
                    "replica": replica, "error": self._load_error}
        body = {"status": "ok", "model": self.model_name, "replica": replica, "engine": self.engine.backend,
                **self.engine.load()}
        stats, cache = getattr(self.engine, "prefix_stats", None), getattr(self.engine, "prefix_cache", None)
        if stats is not None:
            body["prefix_cache"] = {**stats, "hits": cache.hits if cache else 0,
                                    "lookups": cache.lookups if cache else 0, "bytes": cache.bytes if cache else 0}
        return body

    @fastapi_app.get("/health")
    async def health(self) -> Response:
        body = self.status()
        if body["status"] != "ok":
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(self.cfg.limits.retry_after_s)})
        return JSONResponse(body)

    def _card(self) -> S.ModelCard:
        return S.ModelCard(id=self.model_name, created=S.now(), root=self.model_path,
                           max_model_len=self.engine.max_model_len)

    def card(self) -> dict[str, Any]:
        """This variant's ``/v1/models`` entry (for the A/B router; the model is loaded by then)."""
        return self._card().model_dump()

    async def forward(self, method: str, path: str, headers: dict[str, str], body: bytes,
                      ) -> AsyncIterator[dict[str, Any] | bytes]:
        """Answer a request the A/B router forwards (a streaming handle call): first ``{"status", "headers",
        "media_type"}`` (plus ``"body"`` for a whole response), then the chunks of a streamed one. The same
        handlers, validation, metrics and errors as over HTTP; cancelling the call frees the engine slots."""
        name = _FORWARDED.get((method, path))
        if name is None:
            raise ValueError(f"no forwarded route {method} {path}")
        request = ForwardedRequest(headers, body)
        resp = await (self.health() if name == "health" else getattr(self, name)(request))
        head: dict[str, Any] = {"status": resp.status_code, "media_type": resp.media_type,
                                "headers": {k: v for k, v in resp.headers.items() if k.lower() != "content-length"}}
        if not isinstance(resp, StreamingResponse):
            yield {**head, "body": bytes(resp.body)}
            return
        yield head
        chunks = resp.body_iterator
        try:
            async for chunk in chunks:
                yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
        finally:
            await chunks.aclose()

    @fastapi_app.get(ROUTE_MODELS)
    async def models(self, request: Request) -> Response:
        async def fn(request: Request, t0: float) -> Response:
            cards = [self._card()] + [S.ModelCard(id=a, created=S.now(), root=self.model_path,
                                                  max_model_len=self.engine.max_model_len)
                                      for a in self.cfg.aliases]
            return JSONResponse(S.ModelList(data=cards).model_dump())

        return await self._handle(ROUTE_MODELS, request, fn)

    @fastapi_app.get(ROUTE_MODEL)
    async def model(self, model_id: str, request: Request) -> Response:
        async def fn(request: Request, t0: float) -> Response:
            self._check_model(model_id)
            return JSONResponse(self._card().model_copy(update={"id": model_id}).model_dump())

        return await self._handle(ROUTE_MODELS, request, fn)

    @fastapi_app.post(ROUTE_TOKENIZE)
    async def tokenize(self, request: Request) -> Response:
        async def fn(request: Request, t0: float) -> Response:
            data = await self._json(request)
            req = self._validated(data, S.TokenizeChatRequest if "messages" in data else S.TokenizeCompletionRequest)
            if isinstance(req, S.TokenizeChatRequest):
                text = self._render_chat(req.messages, add_generation_prompt=req.add_generation_prompt)
                ids = self.tokenizer(text, add_special_tokens=req.add_special_tokens)["input_ids"]
            else:
                ids = self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
            strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
            return JSONResponse(S.TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len,
                                                   tokens=ids, token_strs=strs).model_dump())

        return await self._handle(ROUTE_TOKENIZE, request, fn)

    @fastapi_app.post(ROUTE_DETOKENIZE)
    async def detokenize(self, request: Request) -> Response:
        async def fn(request: Request, t0: float) -> Response:
            req: S.DetokenizeRequest = await self._parse(request, S.DetokenizeRequest)
            self._check_vocab(req.tokens, "tokens")
            return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})

        return await self._handle(ROUTE_DETOKENIZE, request, fn)

    @fastapi_app.get(ROUTE_TOKENIZER_INFO)
    async def tokenizer_info(self, request: Request) -> Response:
        async def fn(request: Request, t0: float) -> Response:
            tok = self.tokenizer
            return JSONResponse(S.TokenizerInfo(
                tokenizer_class=type(tok).__name__, model_max_length=self.engine.max_model_len,
                bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                unk_token=tok.unk_token, chat_template=tok.chat_template, vocab_size=self.vocab_size,
            ).model_dump())

        return await self._handle(ROUTE_TOKENIZER_INFO, request, fn)

    @fastapi_app.post(ROUTE_COMPLETIONS)
    async def completions(self, request: Request) -> Response:
        return await self._handle(ROUTE_COMPLETIONS, request, self._completions)

    @fastapi_app.post(ROUTE_CHAT)
    async def chat(self, request: Request) -> Response:
        return await self._handle(ROUTE_CHAT, request, self._chat)

    # ------------------------------------------------------------------ completions
    def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.engine.encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt: must not be an empty list", param="prompt")
        if isinstance(prompt[0], str):
            out = [self.engine.encode(p) for p in prompt]
        elif isinstance(prompt[0], int):
            out = [list(prompt)]
        else:
            out = [list(p) for p in prompt]
        lim = self.cfg.limits.max_prompts
        if len(out) > lim:
            raise APIError(400, f"prompt: at most {lim} prompts per request (limits.max_prompts), got {len(out)}: "
                                f"send at most {lim} per request (lm-eval: --batch_size {lim} or less) or raise "
                                "limits.max_prompts", param="prompt")
        for ids in out:
            self._check_vocab(ids, "prompt")
        return out

    def _check_vocab(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                           param=param)

    def _params(self, req: Any, max_tokens: int, index: int, logprobs: int | None, prompt_lp: bool,
                **steer: Any) -> SamplingParams:
        seed = None if req.seed is None else req.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
                              top_k=req.top_k, stop=tuple(req.stop or ()), seed=seed, logprobs=logprobs,
                              prompt_logprobs=prompt_lp, ignore_eos=req.ignore_eos, **steer)

    def _steering(self, req: Any, guidance: Any = None, field: str | None = None) -> dict[str, Any]:
        """The request's output constraint (compiled now: an invalid one is a 400 naming its field, before any
        generation) and its thinking budget (``thinking_token_budget``, else ``reasoning_effort``'s)."""
        if guidance is None:
            guidance, field = req.guidance()
        if guidance is not None:
            try:
                self.engine.compile_guidance(guidance)
            except ValueError as e:
                raise APIError(400, f"{field}: {e}", param=field) from None
        budget = req.thinking_token_budget
        if budget is None and req.reasoning_effort is not None:
            budget = self.cfg.reasoning.effort_budgets.get(req.reasoning_effort)
        return {"guidance": guidance, "thinking_budget": budget}

    @staticmethod
    def _completion_logprobs(entries, offset: int, top: int) -> S.CompletionLogprobs:
        lp = S.CompletionLogprobs()
        for e in entries:
            lp.tokens.append(e.token)
            lp.token_logprobs.append(e.logprob)
            if e.logprob is None:
                lp.top_logprobs.append(None)
            else:
                d = {t: v for _, t, v in e.top[:top]}
                d.setdefault(e.token, e.logprob)
                lp.top_logprobs.append(d)
            lp.text_offset.append(offset)
            offset += len(e.token)
        return lp

    async def _completions(self, request: Request, t0: float) -> Response:
        req: S.CompletionRequest = await self._parse(request, S.CompletionRequest)
        prompts = self._prompts(req.prompt)
        max_tokens = [self._check_context(len(ids), req.max_tokens, self.cfg.limits.default_max_tokens,
                                          echo=req.echo) for ids in prompts]
        steer = self._steering(req)
        self._reserve(len(prompts) * req.n)
        want_prompt_lp = req.echo and req.logprobs is not None
        jobs = [(pi * req.n + k, ids, self._params(req, max_tokens[pi], k, req.logprobs, want_prompt_lp, **steer))
                for pi, ids in enumerate(prompts) for k in range(req.n)]
        prompt_text = {j[0]: self.tokenizer.decode(j[1], skip_special_tokens=False) for j in jobs} if req.echo else {}
        rid, created = S.new_id("cmpl"), S.now()
        prompt_tokens = sum(len(p) for p in prompts)
        route = ROUTE_COMPLETIONS

        def logprobs_for(i: int, ev: StepEvent, offset: int) -> S.CompletionLogprobs | None:
            if req.logprobs is None:
                return None
            entries = (ev.prompt_logprobs or []) + ev.logprobs if req.echo and ev.first else ev.logprobs
            return self._completion_logprobs(entries, offset, req.logprobs)

        if req.stream:
            async def events() -> AsyncIterator[bytes]:
                done_tokens = 0
                offsets = {j[0]: 0 for j in jobs}
                async for i, ev in self._run_choices(jobs, t0, route):
                    done_tokens += len(ev.token_ids)
                    text = (prompt_text[i] if req.echo and ev.first else "") + ev.text
                    lp = logprobs_for(i, ev, offsets[i])
                    offsets[i] += len(text)
                    if not text and ev.finish_reason is None and lp is None:
                        continue
                    chunk = S.CompletionResponse(id=rid, created=created, model=self.model_name, choices=[
                        S.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=ev.finish_reason)])
                    yield _sse(chunk)
                if req.stream_options and req.stream_options.include_usage:
                    usage = S.Usage(prompt_tokens=prompt_tokens, completion_tokens=done_tokens,
                                    total_tokens=prompt_tokens + done_tokens)
                    yield _sse({"id": rid, "object": "text_completion", "created": created,
                                "model": self.model_name, "choices": [], "usage": usage.model_dump()})

            return self._stream(route, t0, events())

        texts: dict[int, list[str]] = {j[0]: [prompt_text.get(j[0], "")] for j in jobs}
        lps: dict[int, list] = {j[0]: [] for j in jobs}
        finish: dict[int, str] = {}
        ntok = 0
        async for i, ev in self._run_choices(jobs, t0, route):
            texts[i].append(ev.text)
            ntok += len(ev.token_ids)
            if req.logprobs is not None:
                lps[i].extend((ev.prompt_logprobs or []) + ev.logprobs if req.echo and ev.first else ev.logprobs)
            if ev.finish_reason:
                finish[i] = ev.finish_reason
        choices = [
            S.CompletionChoice(index=i, text="".join(texts[i]), finish_reason=finish[i],
                               logprobs=self._completion_logprobs(lps[i], 0, req.logprobs)
                               if req.logprobs is not None else None)
            for i in sorted(texts)
        ]
        usage = S.Usage(prompt_tokens=prompt_tokens, completion_tokens=ntok, total_tokens=prompt_tokens + ntok)
        resp = S.CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump())

    # ------------------------------------------------------------------ chat
    def _chat_logprobs(self, entries, top: int) -> S.ChatLogprobs:
        return S.ChatLogprobs(content=[
            S.ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")),
                               top_logprobs=[S.TopLogprob(token=t, logprob=v, bytes=list(t.encode("utf-8")))
                                             for _, t, v in e.top[:top]])
            for e in entries
        ])

    def _render_chat(self, messages: list[S.ChatMessage], *, add_generation_prompt: bool,
                     tools: list[S.Tool] | None = None) -> str:
        try:
            msgs = []
            for m in messages:
                msg: dict[str, Any] = {"role": m.role, "content": m.text()}
                if m.reasoning_content:
                    msg["reasoning_content"] = m.reasoning_content
                if m.tool_calls:
                    msg["tool_calls"] = [{"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}
                                         for c in m.tool_calls]
                msgs.append(msg)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        template = self.tokenizer.chat_template
        if template is None:
            raise APIError(400, f"model {self.model_name!r} has no chat template: use /v1/completions")
        uses_tools = bool(tools) or any(m.role == "tool" or m.tool_calls for m in messages)
        tool_defs = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        if uses_tools and template == CHAT_TEMPLATE:  # r1ray's ChatML: tools in the Hermes format (serve/tools.py)
            return render_tool_prompt(msgs, tool_defs, add_generation_prompt)
        if uses_tools and "tool" not in template:
            raise APIError(400, f"model {self.model_name!r} has a chat template that renders no tools", param="tools")
        return self.tokenizer.apply_chat_template(msgs, tools=tool_defs, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _reasoning_tokens(self, ids: list[int], finish: str | None, prefilled: bool) -> int:
        think, end = self._think_ids
        return count_reasoning_tokens(ids, think, end, prefilled=prefilled, finish_reason=finish)

    async def _chat(self, request: Request, t0: float) -> Response:
        req: S.ChatRequest = await self._parse(request, S.ChatRequest)
        mode = req.tool_mode()
        text = self._render_chat(req.messages, add_generation_prompt=True, tools=req.tools if mode != "none" else None)
        prefilled = prompt_opens_think(text)  # the template opened <think>: the reply starts in the reasoning
        ids = self.engine.encode(text)
        max_tokens = self._check_context(len(ids), req.max_completion_tokens or req.max_tokens,
                                         self.cfg.limits.default_chat_max_tokens)
        tool_defs = [t.model_dump(exclude_none=True) for t in req.tools or []]
        # Every tool's parameters must compile, whatever is chosen (the HF engine's grammar compiler checks them;
        # the vLLM backend cannot force a call, and parses what an auto choice writes without checking schemas).
        if mode in ("auto", "required", "named") and self.engine.backend == "hf":
            try:
                self.engine.compile_guidance(forced_tool_guidance(tool_defs))
            except ValueError as e:
                raise APIError(400, f"tools: {e}", param="tools") from None
        if mode in ("required", "named"):
            name = req.tool_choice.function.name if mode == "named" else None
            steer = self._steering(req, forced_tool_guidance(tool_defs, name), "tool_choice")
        else:
            steer = self._steering(req)
        self._reserve(req.n)
        top = req.top_logprobs or 0
        lp_n = top if req.logprobs else None
        jobs = [(k, ids, self._params(req, max_tokens, k, lp_n, False, starts_in_thinking=prefilled, **steer))
                for k in range(req.n)]
        rid, created = S.new_id("chatcmpl"), S.now()
        route = ROUTE_CHAT
        parse_tools = mode != "none"

        def usage(ntok: int, reasoning: int) -> S.Usage:
            return S.Usage(prompt_tokens=len(ids), completion_tokens=ntok, total_tokens=len(ids) + ntok,
                           completion_tokens_details=S.CompletionTokensDetails(reasoning_tokens=reasoning))

        if req.stream:
            async def events() -> AsyncIterator[bytes]:
                ntok = 0
                splitters = {k: ReasoningStream(prefilled=prefilled) for k in range(req.n)}
                calls = {k: ToolCallStream() for k in range(req.n)}
                out_ids: dict[int, list[int]] = {k: [] for k in range(req.n)}
                reasoning = 0

                def chunk(k: int, delta: S.Delta, finish: str | None = None, lp=None) -> bytes:
                    return _sse(S.ChatChunk(id=rid, created=created, model=self.model_name, choices=[
                        S.ChatChunkChoice(index=k, delta=delta, finish_reason=finish, logprobs=lp)]))

                def deltas(k: int, field: str, piece: str, final: bool) -> list[S.Delta]:
                    if field == "reasoning_content":
                        return [S.Delta(reasoning_content=piece, reasoning=piece)]
                    if not parse_tools:
                        return [S.Delta(content=piece)]
                    return [S.Delta(content=x) if kind == "content" else
                            S.Delta(tool_calls=[x])
                            for kind, x in calls[k].feed(piece, final)]

                for k in range(req.n):
                    yield chunk(k, S.Delta(role="assistant", content=""))
                async for k, ev in self._run_choices(jobs, t0, route):
                    ntok += len(ev.token_ids)
                    out_ids[k].extend(ev.token_ids)
                    final = ev.finish_reason is not None
                    lp = self._chat_logprobs(ev.logprobs, top) if req.logprobs and ev.logprobs else None
                    parts = [d for field, piece in splitters[k].feed(ev.text, ev.finish_reason)
                             for d in deltas(k, field, piece, final)]
                    if final and parse_tools:
                        parts += [S.Delta(content=x) if kind == "content" else
                                  S.Delta(tool_calls=[x])
                                  for kind, x in calls[k].feed("", True)]
                    for j, d in enumerate(parts):
                        yield chunk(k, d, lp=lp if j == 0 else None)
                    if not parts and lp is not None:
                        yield chunk(k, S.Delta(content=""), lp=lp)
                    if final:
                        reasoning += self._reasoning_tokens(out_ids[k], ev.finish_reason, prefilled)
                        finish = "tool_calls" if calls[k].calls and ev.finish_reason == "stop" else ev.finish_reason
                        yield chunk(k, S.Delta(), finish=finish)
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse(S.ChatChunk(id=rid, created=created, model=self.model_name, choices=[],
                                           usage=usage(ntok, reasoning)))

            return self._stream(route, t0, events())

        texts = {k: [] for k in range(req.n)}
        lps: dict[int, list] = {k: [] for k in range(req.n)}
        out_ids: dict[int, list[int]] = {k: [] for k in range(req.n)}
        finish: dict[int, str] = {}
        ntok = 0
        async for k, ev in self._run_choices(jobs, t0, route):
            texts[k].append(ev.text)
            lps[k].extend(ev.logprobs)
            out_ids[k].extend(ev.token_ids)
            ntok += len(ev.token_ids)
            if ev.finish_reason:
                finish[k] = ev.finish_reason
        choices = []
        reasoning_tokens = 0
        for k in range(req.n):
            reasoning, content = split_reasoning("".join(texts[k]), finish[k], prefilled=prefilled)
            reasoning_tokens += self._reasoning_tokens(out_ids[k], finish[k], prefilled)
            tool_calls: list[dict[str, Any]] = []
            if parse_tools:
                content, tool_calls = parse_tool_calls(content)
            fr = "tool_calls" if tool_calls and finish[k] == "stop" else finish[k]
            choices.append(S.ChatChoice(
                index=k, message=S.AssistantMessage(content=content, reasoning_content=reasoning, reasoning=reasoning,
                                                    tool_calls=tool_calls or None),
                finish_reason=fr, logprobs=self._chat_logprobs(lps[k], top) if req.logprobs else None))
        return JSONResponse(S.ChatResponse(id=rid, created=created, model=self.model_name, choices=choices,
                                           usage=usage(ntok, reasoning_tokens)).model_dump())


def _json_or_text(arguments: str) -> Any:
    """A tool call's arguments as the JSON value they hold (rendered as JSON in the prompt), or the text itself."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


OpenAIServer = serve.deployment(name="OpenAIServer")(serve.ingress(fastapi_app)(OpenAIModel))
"""The one-model application's ingress deployment."""


# ---------------------------------------------------------------------------------------------- building


def resolve_model_path(cfg: ServeConfig) -> str:
    """The model directory to serve: ``model_path``, or the newest export of run ``run_name``.

    Serving never trains: preparing a missing model is the orchestration layer's business
    (``r1ray.pipeline.upstream``, which ``jobs/serve.py`` calls when ``train_if_missing`` is set)."""
    if cfg.model_path:
        path = Path(cfg.model_path).expanduser()
        if "://" not in cfg.model_path:
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model_path={cfg.model_path}: not a Hugging Face model directory "
                                        "(no config.json); point it at an export directory")
            return str(path.resolve())
        return cfg.model_path
    from r1ray.model.export import newest_export

    run_dir = cfg.storage.uri("runs", cfg.run_name)
    found = newest_export(run_dir)
    if found is None:
        raise FileNotFoundError(f"no model export in {run_dir}: train it first (python jobs/pretrain.py) or set "
                                "model_path to a Hugging Face model directory")
    return found


def default_model_name(cfg: ServeConfig, model_path: str) -> str:
    """``model_name``, else ``r1ray-<run_name>`` for a run's export, else the model directory's name."""
    if cfg.model_name:
        return cfg.model_name
    return f"r1ray-{cfg.run_name}" if cfg.model_path is None else Path(model_path.rstrip("/")).name


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """``Deployment.options`` from the config: replicas or autoscaling, resources, Serve's request cap."""
    d = cfg.deployment
    actor: dict[str, Any] = {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}
    if d.resources:
        actor["resources"] = dict(d.resources)
    opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": cfg.max_ongoing_requests(),
                            "health_check_period_s": 10,
                            "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s}
    if d.autoscaling is not None:
        a = d.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": max(a.min_replicas, 1), "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
        }
    else:
        opts["num_replicas"] = d.num_replicas
    return opts


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``import_path: r1ray.serve.app:build_app``); ``args`` are ServeConfig fields.

    Serve requires exactly one parameter here. It never trains: without ``model_path`` it serves the run's
    newest export, or fails naming the run directory. With ``variants`` it builds the A/B application
    (``r1ray.serve.ab``): a router ingress in front of one deployment per variant.
    """
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(dict(args or {}))
    if cfg.variants:
        return _build_ab_app(cfg, {n: resolve_model_path(cfg.variant_config(n)) for n in cfg.variants})
    model_path = resolve_model_path(cfg)
    init = cfg.model_dump(mode="json")
    init["model_path"] = model_path
    init["model_name"] = default_model_name(cfg, model_path)
    if cfg.auth.api_key is not None:
        init["auth"]["api_key"] = cfg.auth.api_key.get_secret_value()
    return OpenAIServer.options(**deployment_options(cfg)).bind(init)


def _version(init: dict[str, Any]) -> str:
    """A deployment version from its init args: ``serve.run`` keeps the replicas of a deployment whose version
    and options are unchanged (its default is a random version, which restarts every replica)."""
    return hashlib.sha256(json.dumps(init, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build_ab_app(cfg: ServeConfig, model_paths: dict[str, str]) -> serve.Application:
    """The A/B application: one ``OpenAIModel`` deployment per variant (``model_paths``: variant -> resolved
    model directory) behind the ``ABRouter`` ingress, which gets the weights as its ``user_config``."""
    handles = {}
    drain = cfg.deployment.graceful_shutdown_timeout_s
    for name in cfg.variants:
        vcfg = cfg.variant_config(name)
        init = vcfg.model_dump(mode="json")
        init["model_path"] = model_paths[name]
        if vcfg.auth.api_key is not None:
            init["auth"]["api_key"] = vcfg.auth.api_key.get_secret_value()
        opts = {**deployment_options(vcfg), "name": f"OpenAIServer-{name}", "max_surge_percent": 100}
        drain = max(drain, vcfg.deployment.graceful_shutdown_timeout_s)
        dep = serve.deployment(OpenAIModel).options(**opts)
        # Serve's public API no longer takes a version; its internal option is the only way to keep an unchanged
        # variant's replicas (and loaded model) across serve.run. Without it they would be replaced, still with
        # no dropped request (surge + load-before-ready), only slower.
        dep = dep.options(version=_version(init), _internal=True)
        handles[name] = dep.bind(init, True)
    init = cfg.model_dump(mode="json")
    if cfg.auth.api_key is not None:
        init["auth"]["api_key"] = cfg.auth.api_key.get_secret_value()
    # The weights travel in user_config alone, so a weight change leaves the router's version as it is and Serve
    # reconfigures the running router in place (no replica restarted, nothing in flight touched).
    init["variants"] = {n: {**v, "weight": 1.0} for n, v in init["variants"].items()}
    router = ABRouter.options(
        num_replicas=cfg.router.num_replicas, ray_actor_options={"num_cpus": cfg.router.num_cpus},
        max_ongoing_requests=ROUTER_MAX_ONGOING, graceful_shutdown_timeout_s=drain, max_surge_percent=100,
        user_config={"weights": {n: v.weight for n, v in cfg.variants.items()}},
    )
    router = router.options(version=_version(init), _internal=True)
    return router.bind(init, handles)
