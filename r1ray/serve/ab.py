"""A/B serving: several model exports in one Serve application, behind a thin router ingress.

Each variant (``ServeConfig.variants``) is its own ``OpenAIModel`` deployment (its replicas, its engine, its
resources), not reachable over HTTP; the ``ABRouter`` deployment is the app's ingress. For each request it reads
the ``model`` (and ``user``) of the body and picks the variant:

* a variant's name: that variant;
* an alias (``ServeConfig.aliases``; no ``model`` means the first alias): a variant drawn by weight. With a user
  id (the ``router.sticky_header`` header, else OpenAI's ``user`` field) the draw is a hash of (alias, user), so
  the same user always lands on the same variant while the weights stay the same (and when they change, only
  the users whose hash falls in the moved share change variant: the variants keep their order on [0, 1));
  without one it is a fresh random draw per request;
* anything else: 404 naming the model ids served.

It then hands the raw request (method, path, auth header, body) to the variant through a streaming deployment
handle call (``OpenAIModel.forward``): validation, errors, metrics and the response shapes are the variant's own,
byte for byte what a one-model app answers; the router only relays the status, headers and chunks. The response's
``model`` is the variant that served it.

Why deployments per variant and not Serve's model multiplexing: the variants of an A/B test need their own replica
counts, engines and GPUs (a 10 % canary should not take a slot in every replica of the 90 % model, nor load on first
use), and the router hop is needed either way (multiplexing routes on a header, and OpenAI clients name the model in
the body). ``benchmarks/ab_load.py`` measures what the hop costs against a one-model app.

``r1ray.serve.app.build_app`` assembles the application (the router, and the variants as ``OpenAIModel``
deployments).

Zero-drop weight changes: the weights are the router's ``user_config``. ``serve.run`` of the same app with new
weights redeploys only the router (``app.build_app`` gives each variant a version derived from its config, so an
unchanged variant keeps its replicas and its loaded model), with ``max_surge_percent=100``: the new router replica
starts before the old one drains its in-flight requests. A variant whose config changed is replaced the same way,
and its replica counts as started only once its model is loaded (``OpenAIModel(variant=True)``), so no request
meets a loading replica. A Serve config file (or a KubeRay RayService) can change ``user_config.weights`` of the
``ABRouter`` deployment for an in-place update.
"""


import asyncio
import hashlib
import random
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from r1ray.observe.log import get_logger, setup_logging
from r1ray.observe.metrics import record
from r1ray.serve import protocol as P
from r1ray.serve import schemas as S
from r1ray.serve.config import ServeConfig
from r1ray.serve.protocol import APIError, check_auth, parse_json_body, read_body

log = get_logger(__name__)

UNROUTED = "unrouted"
"""``model``/``variant`` label of requests the router refuses before it picks a variant (401, 404, bad JSON)."""
ROUTER_DEPLOYMENT = "ABRouter"
ROUTER_MAX_ONGOING = 4096
"""Requests one router replica holds at once; the variants' own queues (``limits.max_queue``) bound the work."""


def unit_hash(alias: str, user: str) -> float:
    """A stable draw in [0, 1) for (alias, user): the same in every router replica and across restarts."""
    digest = hashlib.blake2b(f"{alias}\0{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick(weights: dict[str, float], u: float) -> str:
    """The variant whose share of [0, 1) holds ``u``, the variants laid out in ``weights``' order."""
    live = [(n, w) for n, w in weights.items() if w > 0]
    total = sum(w for _, w in live)
    x, acc = u * total, 0.0
    for name, w in live:
        acc += w
        if x < acc:
            return name
    return live[-1][0]


def check_weights(weights: Any, variants: list[str], *, need_positive: bool = True) -> dict[str, float]:
    """``user_config.weights`` validated: a weight >= 0 for every variant (one > 0 when an alias needs it), in
    the variants' order."""
    if not isinstance(weights, dict) or set(weights) != set(variants):
        raise ValueError(f"user_config.weights must give a weight to each variant {variants}, got {weights!r}")
    bad = {k: v for k, v in weights.items() if not isinstance(v, int | float) or isinstance(v, bool) or v < 0}
    if bad:
        raise ValueError(f"user_config.weights: each weight must be a number >= 0, got {bad}")
    if need_positive and not any(weights.values()):
        raise ValueError("user_config.weights: every weight is 0; give at least one variant a weight > 0")
    return {n: float(weights[n]) for n in variants}


router_app = FastAPI(title="r1ray", description="OpenAI-compatible API over r1ray models (A/B router)",
                     docs_url=None, redoc_url=None)


@serve.deployment(name=ROUTER_DEPLOYMENT)
@serve.ingress(router_app)
class ABRouter:
    """The A/B application's ingress: picks a variant per request and relays its answer."""

    def __init__(self, cfg: dict[str, Any], variants: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(cfg)
        setup_logging(self.cfg.logging.level)
        self.handles = variants
        self.names = list(self.cfg.variants)
        self.aliases = list(self.cfg.aliases)
        # Serve calls reconfigure with user_config.weights right after __init__ and on every weight change.
        self.weights = {n: v.weight for n, v in self.cfg.variants.items()}
        self.api_key = self.cfg.auth.resolve()
        self.sticky_header = self.cfg.router.sticky_header.lower()
        self._rng = random.Random()  # seeded from os.urandom: unsticky draws are independent per router replica
        self._cards: dict[str, dict[str, Any]] = {}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config: {weights: {variant: weight}}`` (set by ``app.build_app``; a Serve config file may change
        it in place)."""
        self.weights = check_weights(user_config.get("weights"), self.names, need_positive=bool(self.aliases))
        log.info("A/B weights: %s", self.weights)

    # ------------------------------------------------------------------ routing
    def choose(self, model: Any, user: str | None) -> tuple[str, str, bool]:
        """(variant, the name asked for, sticky) for a request's ``model``; APIError when it names nothing."""
        if model is None:  # the variant then answers as a one-model app does (400 where `model` is required)
            model = self.aliases[0] if self.aliases else self.names[0]
        if not isinstance(model, str):
            raise APIError(400, "model: Input should be a valid string", param="model")
        if model in self.handles:
            return model, model, False
        if model not in self.aliases:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self._ids()}", param="model",
                           code="model_not_found")
        if user:
            return pick(self.weights, unit_hash(model, user)), model, True
        return pick(self.weights, self._rng.random()), model, False

    def _ids(self) -> str:
        return ", ".join(repr(n) for n in (*self.names, *self.aliases))

    def _refused(self, route: str, e: APIError) -> Response:
        record("r1ray_serve_requests", 1, route=route, status=str(e.status), model=UNROUTED, variant=UNROUTED)
        return e.response()

    async def _route(self, route: str, request: Request) -> Response:
        try:
            check_auth(self.api_key, request.headers)
            body = await read_body(request, self.cfg.limits.max_body_bytes)
            data = parse_json_body(body, self.cfg.limits.max_json_depth)
            user = request.headers.get(self.sticky_header) or data.get("user")
            variant, asked, sticky = self.choose(data.get("model"), user if isinstance(user, str) else None)
        except APIError as e:
            return self._refused(route, e)
        record("r1ray_serve_ab_routed", 1, alias=asked, variant=variant, sticky=str(sticky).lower())
        return await self._forward(variant, "POST", route, request, body)

    async def _forward(self, variant: str, method: str, route: str, request: Request, body: bytes) -> Response:
        headers = {"content-length": str(len(body))}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        gen = self.handles[variant].options(stream=True).forward.remote(method, route, headers, body)
        try:
            head = await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.router.forward_timeout_s)
        except TimeoutError:
            gen.cancel()
            return APIError(503, f"variant {variant!r} did not answer within router.forward_timeout_s "
                                 f"({self.cfg.router.forward_timeout_s:.0f} s)", type="server_error",
                            code="variant_timeout",
                            headers={"Retry-After": str(self.cfg.limits.retry_after_s)}).response()
        except asyncio.CancelledError:  # the client went away: stop the variant's work too
            gen.cancel()
            raise
        except Exception as e:  # e.g. the variant's replica died mid-request: answer, and the client may retry
            log.warning("variant %r failed on %s: %s: %s", variant, route, type(e).__name__, e)
            return APIError(503, f"variant {variant!r} failed on this request ({type(e).__name__}); retry after "
                                 f"{self.cfg.limits.retry_after_s} s", type="server_error", code="variant_error",
                            headers={"Retry-After": str(self.cfg.limits.retry_after_s)}).response()
        if "body" in head:
            return Response(content=head["body"], status_code=head["status"], headers=head["headers"])

        async def chunks():
            done = False
            try:
                async for chunk in gen:
                    yield chunk
                done = True
            finally:
                if not done:
                    gen.cancel()

        return StreamingResponse(chunks(), status_code=head["status"], headers=head["headers"],
                                 media_type=head["media_type"])

    # ------------------------------------------------------------------ routes
    # The POST routes a variant answers: one endpoint, each route under its own name, relaying on the route the
    # request came in on (decorators apply bottom-up: the app lists completions, chat, tokenize, detokenize).
    @router_app.post(P.ROUTE_DETOKENIZE, name="detokenize")
    @router_app.post(P.ROUTE_TOKENIZE, name="tokenize")
    @router_app.post(P.ROUTE_CHAT, name="chat")
    @router_app.post(P.ROUTE_COMPLETIONS, name="completions")
    async def relay(self, request: Request) -> Response:
        return await self._route(request.scope["route"].path, request)

    @router_app.get(P.ROUTE_TOKENIZER_INFO)
    async def tokenizer_info(self, request: Request, model: str | None = None) -> Response:
        """The tokenizer of the variant ``?model=`` names (an alias or none: the first variant)."""
        try:
            check_auth(self.api_key, request.headers)
            variant = model if model in self.handles else None
            if variant is None and model is not None and model not in self.aliases:
                self.choose(model, None)  # 404 naming the served ids
            variant = variant or self.names[0]
        except APIError as e:
            return self._refused(P.ROUTE_TOKENIZER_INFO, e)
        return await self._forward(variant, "GET", P.ROUTE_TOKENIZER_INFO, request, b"")

    @router_app.get(P.ROUTE_HEALTH)
    async def health(self) -> Response:
        """``ok`` once every variant answers ``ok``; 503 ``loading`` (or ``error``) otherwise, per variant."""
        async def one(name: str) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(self.handles[name].status.remote(), timeout=5)
            except TimeoutError:
                return {"status": "loading", "model": name, "error": "no replica answered within 5 s"}
            except Exception as e:  # noqa: BLE001 - a failed variant is reported, not raised
                return {"status": "error", "model": name, "error": f"{type(e).__name__}: {e}"}

        states = dict(zip(self.names, await asyncio.gather(*(one(n) for n in self.names)), strict=True))
        worst = next((s for s in ("error", "loading") if any(v["status"] == s for v in states.values())), "ok")
        body = {"status": worst, "variants": states, "aliases": self.aliases, "weights": self.weights}
        if worst != "ok":
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(self.cfg.limits.retry_after_s)})
        return JSONResponse(body)

    async def _card(self, name: str) -> dict[str, Any]:
        if name not in self._cards:
            self._cards[name] = await self.handles[name].card.remote()
        return self._cards[name]

    async def _alias_card(self, alias: str) -> S.ModelCard:
        lens = [(await self._card(n))["max_model_len"] for n, w in self.weights.items() if w > 0]
        total = sum(self.weights.values())
        return S.ModelCard(id=alias, created=S.now(), max_model_len=min(lens),
                           split={n: w / total for n, w in self.weights.items() if w > 0})

    @router_app.get(P.ROUTE_MODELS)
    async def models(self, request: Request) -> Response:
        try:
            check_auth(self.api_key, request.headers)
        except APIError as e:
            return self._refused(P.ROUTE_MODELS, e)
        cards = [S.ModelCard.model_validate(await self._card(n)) for n in self.names]
        cards += [await self._alias_card(a) for a in self.aliases]
        return JSONResponse(S.ModelList(data=cards).model_dump())

    @router_app.get(P.ROUTE_MODEL)
    async def model(self, model_id: str, request: Request) -> Response:
        try:
            check_auth(self.api_key, request.headers)
            if model_id not in self.handles and model_id not in self.aliases:
                self.choose(model_id, None)
        except APIError as e:
            return self._refused(P.ROUTE_MODELS, e)
        card = await self._alias_card(model_id) if model_id in self.aliases else \
            S.ModelCard.model_validate(await self._card(model_id))
        return JSONResponse(card.model_dump())


__all__ = ["ABRouter", "ROUTER_DEPLOYMENT", "ROUTER_MAX_ONGOING", "UNROUTED", "check_weights", "pick",
           "unit_hash"]
