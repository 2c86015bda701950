"""The vLLM engine: r1ray's ``Engine`` protocol (``r1ray.infer.types``) on vLLM's ``AsyncLLM`` (vLLM >= 0.8,
the V1 engine; ``AsyncLLMEngine`` is the same class there).

GPU only (vLLM's wheels are CUDA builds); ``make_engine`` uses the HF engine and logs why when vLLM is not
importable. vLLM is imported lazily, inside the functions that need it, so ``import r1ray.infer.vllm`` works on a
CPU machine without vLLM. Tests: tests/gpu/test_vllm_engine.py (skipped without CUDA and vLLM).

Design:
- One event loop of its own, in a thread, owns the ``AsyncLLM`` (its output handler is bound to the loop it
  started on). ``stream`` (async, any caller loop: Ray Serve's) and ``generate`` / ``update_weights``
  (blocking: evaluation, GRPO rollouts) both hand their work to that loop.
- Stops as in ``HFEngine``: EOS and ``<|im_end|>`` (unless ``ignore_eos``), stop strings (vLLM holds back
  partial matches), per-request seed, top-k/top-p, sampled and prompt logprobs.
- ``on_batch(sequences, tokens, seconds)`` after each engine step, from a vLLM stat logger.
- ``update_weights``: waits until no r1ray request is in flight (new ones wait), loads the tensors in every
  worker through ``collective_rpc`` and a worker extension (``WeightSyncExtension``: vLLM's own
  ``model.load_weights``, which takes Hugging Face names), then clears the prefix cache (KV computed by the old
  policy) and sets ``weights_version``: no completion mixes two policies.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from r1ray.infer.types import (
    Completion,
    EngineFullError,
    Guidance,
    OnBatch,
    SamplingParams,
    StepEvent,
    TokenLogprob,
)
from r1ray.observe.log import get_logger

log = get_logger(__name__)


def vllm_available() -> tuple[bool, str]:
    """Whether vLLM can run here, and why not."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False, "torch is not importable"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return False, f"vllm is not importable ({e})"
    return True, ""


class WeightSyncExtension:
    """Mixed into vLLM's GPU workers (``AsyncEngineArgs(worker_extension_cls=...)``); its methods run in every
    worker through ``AsyncLLM.collective_rpc``. ``self`` is the vLLM worker (``self.model_runner.model``)."""

    def r1ray_load_weights(self, weights: list[tuple[str, Any]]) -> int:
        """Load (Hugging Face name, CPU tensor) pairs with the model's own loader (fuses q/k/v, gate/up)."""
        model = self.model_runner.model  # type: ignore[attr-defined]
        model.load_weights(weights=iter(weights))
        return len(weights)


def _model_len(engine: Any) -> int:
    """The engine's context length: ``AsyncLLM.model_config`` (vLLM >= 0.8), else its ``vllm_config``."""
    mc = getattr(engine, "model_config", None) or getattr(getattr(engine, "vllm_config", None), "model_config", None)
    if mc is None or not getattr(mc, "max_model_len", None):
        raise RuntimeError(f"cannot read max_model_len from {type(engine).__name__} (no model_config or "
                           "vllm_config.model_config): r1ray supports vLLM >= 0.8 (the V1 AsyncLLM)")
    return int(mc.max_model_len)


def _param_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors export (headers only), plus ``lm_head.weight`` when tied."""
    import json

    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    emb = "model.embed_tokens.weight"
    if cfg.get("tie_word_embeddings") and emb in shapes:
        shapes.setdefault("lm_head.weight", shapes[emb])
    return shapes


def _batch_logger_factory(on_batch: OnBatch):
    """A vLLM stat logger class that turns each engine step's stats into ``on_batch(sequences, tokens,
    seconds)``. vLLM calls ``record`` from the engine's output handler after every step; the seconds are the
    time since the previous step, counted only when that step had requests running (else it was idle)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class BatchStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):  # noqa: ARG002 - vLLM's factory signature
            self._last: float | None = None
            self._running = 0

        def record(self, scheduler_stats: Any = None, iteration_stats: Any = None, *args: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            running = getattr(scheduler_stats, "num_running_reqs", None)
            tokens = int(getattr(iteration_stats, "num_generation_tokens", 0) or 0)
            if self._last is not None and self._running > 0 and tokens:
                try:
                    on_batch(self._running, tokens, now - self._last)
                except Exception:  # noqa: BLE001 - a metrics callback must not kill vLLM's output handler
                    log.exception("on_batch callback failed")
            self._last = now
            if running is not None:
                self._running = int(running)

        def log_engine_initialized(self) -> None:
            pass

    return BatchStats


class VLLMEngine:
    """vLLM's ``AsyncLLM`` behind r1ray's engine protocol (continuous batching is vLLM's own)."""

    backend = "vllm"

    def __init__(self, model_path: str, *, max_batch_size: int = 64, max_queue: int = 256,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 on_batch: OnBatch | None = None, gpu_memory_utilization: float = 0.9,
                 start_timeout_s: float = 600.0):
        from vllm import AsyncEngineArgs

        from r1ray.model.tokenizer import load_tokenizer, stop_token_ids

        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self.weights_version = 0
        self.stop_token_ids = sorted(stop_token_ids(self.tokenizer))
        self._shapes = _param_shapes(self.model_path)
        self._pending = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._updating = False
        self._token_text: dict[int, str] = {}
        args = AsyncEngineArgs(
            model=self.model_path, max_num_seqs=max_batch_size, max_model_len=max_model_len, dtype=dtype,
            seed=seed, gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}",
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="r1ray-vllm", daemon=True)
        self._thread.start()
        try:
            self.engine = self._run(self._start(args), start_timeout_s)
        except BaseException:
            self._stop_loop()
            raise
        self.max_model_len = _model_len(self.engine)
        log.info("vLLM engine: %s, context %d, max %d sequences", self.model_path, self.max_model_len, max_batch_size)

    async def _start(self, args: Any) -> Any:
        """Create the AsyncLLM on the engine loop, so its output handler runs there."""
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:  # vLLM releases that export it only under its old name (same class in V1)
            from vllm import AsyncLLMEngine as AsyncLLM
        loggers = [_batch_logger_factory(self.on_batch)] if self.on_batch is not None else None
        return AsyncLLM.from_engine_args(args, stat_loggers=loggers)

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking VLLMEngine call was made from its own event loop; use stream()")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ protocol
    def load(self) -> dict[str, int]:
        with self._lock:
            return {"running": self._pending, "waiting": 0, "pending": self._pending}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def reserve(self, n: int) -> None:
        with self._lock:
            if self._pending + n > self.max_queue:
                raise EngineFullError(f"engine full ({self._pending} of {self.max_queue} sequences, {n} asked)")

    def start(self) -> None:
        pass  # the engine runs from construction

    def shutdown(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        self._stop_loop()

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_model_len} tokens")

    def _try_admit(self) -> bool:
        """Count one more request in flight; False while a weight update holds the engine (the caller waits)."""
        with self._lock:
            if self._updating:
                return False
            if self._pending + 1 > self.max_queue:
                raise EngineFullError(f"engine full ({self._pending} of {self.max_queue} sequences)")
            self._pending += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1
            self._idle.notify_all()

    def _vllm_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        if params.processed_logprobs and params.logprobs is not None and params.temperature not in (0, 1.0):
            raise ValueError("processed_logprobs at a temperature other than 1: this vLLM backend returns the raw "
                             "distribution's logprobs (vLLM sets logprobs_mode per engine); sample at temperature 1 "
                             "or use the hf backend")

        kw: dict[str, Any] = dict(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            stop=list(params.stop) or None, seed=params.seed, ignore_eos=params.ignore_eos,
            # <|im_end|> ends a chat turn like EOS does; ignore_eos keeps going past both (as HFEngine)
            stop_token_ids=None if params.ignore_eos else list(self.stop_token_ids),
            logprobs=params.logprobs,
            prompt_logprobs=(params.logprobs or 0) if params.prompt_logprobs else None,
            output_kind=RequestOutputKind.DELTA,
        )
        if params.top_k > 0:  # vLLM's "off" value changed across releases (-1, then 0): leave its default
            kw["top_k"] = params.top_k
        if params.thinking_budget is not None:
            raise ValueError("thinking_budget / reasoning_effort: not supported by r1ray's vLLM backend; use "
                             "engine.backend=hf")
        if params.guidance is not None:
            kw.update(self._structured(params.guidance))
        return VSP(**kw)

    def compile_guidance(self, g: Guidance) -> Any:
        """Check ``g`` as far as can be done before vLLM compiles it (its grammar backend reports the rest)."""
        if g.kind == "tool_call":
            raise ValueError("forced tool calls are not supported by r1ray's vLLM backend; use engine.backend=hf")
        if g.kind == "json_schema":
            try:
                json.loads(g.spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        return g

    @staticmethod
    def _structured(g: Guidance) -> dict[str, Any]:
        """vLLM's structured-output parameters for ``g`` (``StructuredOutputsParams`` in current releases,
        ``GuidedDecodingParams`` before). vLLM applies them after ``</think>`` only when the server runs with a
        reasoning parser; r1ray's vLLM engine has none, so a thinking reply is constrained from its first token."""
        try:
            from vllm.sampling_params import StructuredOutputsParams as P
            key = "structured_outputs"
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams as P
            key = "guided_decoding"
        value: dict[str, Any] = {
            "json_schema": {"json": json.loads(g.spec) if g.kind == "json_schema" else None},
            "json_object": {"json_object": True}, "regex": {"regex": g.spec}, "grammar": {"grammar": g.spec},
            "choice": {"choice": list(g.choices)}}[g.kind]
        return {key: P(**value)}

    def _tok(self, tid: int) -> str:
        t = self._token_text.get(tid)
        if t is None:
            t = self._token_text[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return t

    def _entry(self, tid: int, lp_dict: Mapping[int, Any] | None, top: int) -> TokenLogprob:
        if not lp_dict or tid not in lp_dict:
            return TokenLogprob(tid, self._tok(tid), None)
        lp = lp_dict[tid]
        alts = sorted(lp_dict.items(), key=lambda kv: -kv[1].logprob)[:top]
        return TokenLogprob(tid, lp.decoded_token or self._tok(tid), float(lp.logprob),
                            [(int(t), v.decoded_token or self._tok(int(t)), float(v.logprob)) for t, v in alts])

    async def _produce(self, prompt_ids: list[int], params: SamplingParams, emit: Any) -> None:
        """On the engine loop: run one request and ``emit`` each StepEvent (or the exception that ended it)."""
        from vllm.inputs import TokensPrompt

        rid = uuid.uuid4().hex
        first, finished = True, False
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids),
                                                  self._vllm_params(params), rid):
                o = out.outputs[0]
                lps = []
                if params.logprobs is not None:
                    entries = o.logprobs or [None] * len(o.token_ids)
                    lps = [self._entry(t, d, params.logprobs) for t, d in zip(o.token_ids, entries, strict=False)]
                finish = None
                if out.finished:  # vLLM: stop, length or abort
                    finish = {"abort": "cancelled"}.get(o.finish_reason, o.finish_reason or "stop")
                ev = StepEvent(o.text, list(o.token_ids), lps, finish_reason=finish, first=first)
                if first and params.prompt_logprobs and out.prompt_logprobs is not None:
                    top = params.logprobs or 0
                    ev.prompt_logprobs = [TokenLogprob(prompt_ids[0], self._tok(prompt_ids[0]), None)] + [
                        self._entry(prompt_ids[j], out.prompt_logprobs[j], top) for j in range(1, len(prompt_ids))]
                first = False
                finished = out.finished
                emit(ev)
                if finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            emit(e)
        finally:
            if not finished:
                await self.engine.abort(rid)

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[StepEvent]:
        """Async events of one sequence; closing or cancelling the iterator aborts it in vLLM."""
        ids = list(prompt_ids)
        self._check(ids, params)
        while not self._try_admit():  # a weight update is draining the engine: wait for it
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        fut = asyncio.run_coroutine_threadsafe(
            self._produce(ids, params, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev)), self._loop)
        try:
            while True:
                ev = await q.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            fut.cancel()  # cancels the request's task on the engine loop: vLLM aborts it
            self._release()

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Generate for every prompt (vLLM batches them), blocking; the in-process API."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        ids_list = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids, p in zip(ids_list, plist, strict=True):
            self._check(ids, p)
        self.reserve(len(prompts))

        async def one(ids: list[int], p: SamplingParams) -> Completion:
            t0 = time.perf_counter()
            ttft = 0.0
            evs: list[StepEvent] = []
            async for ev in self.stream(ids, p):
                if not evs:
                    ttft = time.perf_counter() - t0
                evs.append(ev)
            return Completion("".join(e.text for e in evs), [t for e in evs for t in e.token_ids], ids,
                              evs[-1].finish_reason or "stop", [lp for e in evs for lp in e.logprobs],
                              evs[0].prompt_logprobs, ttft, time.perf_counter() - t0)

        async def all_() -> list[Completion]:
            return list(await asyncio.gather(*(one(ids, p) for ids, p in zip(ids_list, plist, strict=True))))

        return self._run(all_())

    def update_weights(self, named_tensors: Mapping[str, Any], version: int, *, timeout_s: float = 120.0) -> None:
        """Load ``named_tensors`` (Hugging Face state-dict names) into every vLLM worker once no request is in
        flight (new ones wait), drop the prefix cache, then ``weights_version = version``.

        Every name must be a tensor of the served model and every shape must match (checked before anything is
        sent). Tied weights may be sent under either name."""
        import torch

        for name, t in named_tensors.items():
            if name not in self._shapes:
                raise KeyError(f"update_weights: the model has no tensor {name!r}")
            if tuple(t.shape) != self._shapes[name]:
                raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, the model's is "
                                 f"{self._shapes[name]}")
        payload = [(n, torch.as_tensor(t).detach().to("cpu").contiguous()) for n, t in named_tensors.items()]
        deadline = time.perf_counter() + timeout_s
        with self._lock:
            self._updating = True
            try:
                while self._pending:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        raise TimeoutError(f"update_weights: the engine stayed busy for {timeout_s:.0f}s")
                    self._idle.wait(left)
            except BaseException:
                self._updating = False
                raise
        try:
            self._run(self.engine.collective_rpc("r1ray_load_weights", args=(payload,)), timeout_s)
            self._run(self.engine.reset_prefix_cache(), timeout_s)
            self.weights_version = int(version)
        finally:
            with self._lock:
                self._updating = False
