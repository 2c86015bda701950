"""Batched generation with a KV cache on any Hugging Face causal-LM directory; no Ray, no HTTP.

``HFEngine`` runs one scheduler thread that does continuous batching: sequences that arrive while a batch is
decoding are prefilled and merged into it at the next step (their KV caches left-padded to a common length),
and finished or cancelled sequences leave it at once, so a client that disconnects frees its slot. Every
sequence carries its own sampling parameters (greedy, temperature, top-p, top-k, stop strings, seed, logprobs).

One sequence cannot fail its batch-mates: parameters the engine cannot represent are refused at ``submit``
(``ValueError`` naming the field); a sequence whose sampling or consumer raises is failed alone; and when a
batched forward pass raises, its sequences are retried one by one and only those that fail again end, with
``finish_reason == "error"``.

Use it in-process (tests, benchmarks)::

    eng = HFEngine.from_dir("outputs/runs/default/export")
    [out] = eng.generate(["1 + 1 ="], SamplingParams(max_tokens=8, temperature=0))

or from asyncio (the Serve app) with ``async for ev in eng.stream(prompt_ids, params)``.
``r1ray.infer.make_engine`` picks the vLLM engine instead when asked for and importable.
"""

from __future__ import annotations

import asyncio
import math
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from r1ray.infer.text import find_stop, stop_holdback
from r1ray.infer.types import Completion, EngineFullError, Guidance, SamplingParams, StepEvent, TokenLogprob
from r1ray.model.tokenizer import END_THINK, THINK, stop_token_ids, token_id
from r1ray.observe.log import get_logger

log = get_logger(__name__)

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds ``torch.Generator.manual_seed`` accepts."""


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the field when ``params`` hold a value the engine cannot represent."""
    p = params
    problems = []
    if not isinstance(p.max_tokens, int) or p.max_tokens < 0:
        problems.append(f"max_tokens must be an integer >= 0, got {p.max_tokens!r}")
    if not (isinstance(p.temperature, int | float) and math.isfinite(p.temperature) and p.temperature >= 0):
        problems.append(f"temperature must be a finite number >= 0, got {p.temperature!r}")
    if not (isinstance(p.top_p, int | float) and 0 < p.top_p <= 1):
        problems.append(f"top_p must be in (0, 1], got {p.top_p!r}")
    if not isinstance(p.top_k, int) or p.top_k < 0:
        problems.append(f"top_k must be an integer >= 0, got {p.top_k!r}")
    if p.seed is not None and not (isinstance(p.seed, int) and SEED_MIN <= p.seed <= SEED_MAX):
        problems.append(f"seed must be an integer in [-2**63, 2**64 - 1], got {p.seed!r}")
    if p.logprobs is not None and not (isinstance(p.logprobs, int) and 0 <= p.logprobs <= vocab_size):
        problems.append(f"logprobs must be an integer in [0, {vocab_size}], got {p.logprobs!r}")
    if any(not isinstance(x, str) or not x for x in p.stop):
        problems.append("stop strings must be non-empty strings")
    if p.thinking_budget is not None and not (isinstance(p.thinking_budget, int) and p.thinking_budget >= 0):
        problems.append(f"thinking_budget must be an integer >= 0, got {p.thinking_budget!r}")
    if problems:
        raise ValueError("; ".join(problems))


class _Seq:
    """One sequence's state, owned by the scheduler thread (only ``cancelled`` is touched from outside)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[StepEvent], None]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.cancelled = False
        self.out_ids: list[int] = []
        self.text = ""  # decoded completion text so far (stop strings cut it)
        self.emitted = 0  # chars of self.text already sent
        self.prefix_offset = 0
        self.read_offset = 0
        self.generator: Any = None
        self.first = True
        self.done = False
        self.prompt_lp: list[TokenLogprob] | None = None
        self.t_submit = time.perf_counter()
        self.steer: Any = None  # r1ray.infer.guided.Steer when the params carry guidance or a thinking budget
        self.lazy_text = False  # decode the text once at the end (see HFEngine.submit)


class _BrokenSteer:
    """Stands in for a steer whose grammar matcher raised: the sequence fails at its next token."""

    def constrained(self) -> bool:
        return False

    def forced(self) -> None:
        return None

    def banned(self) -> None:
        return None

    def advance(self, tid: int) -> None:
        raise RuntimeError("the grammar matcher of this sequence failed")


def _device_and_dtype(device: str, dtype: str):
    import torch

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    if dtype == "auto":
        dt = torch.bfloat16 if dev == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    return torch.device(dev), dt


class _KV(list):
    """A batch's KV cache as ``[(keys, values), ...]`` per layer, plus the buffered cache object they are views
    of, so the next decode step reuses it instead of copying every tensor into a new one."""

    def __init__(self, cache: Any) -> None:
        super().__init__((layer.keys, layer.values) for layer in cache.layers)
        self.cache = cache


def _buffered_cache(kv: list[tuple[Any, Any]]) -> Any:
    """A ``DynamicCache`` whose layers keep their keys and values in buffers with spare room: a decode step writes
    its one new column in place. Rebuilding a ``DynamicCache`` from tensors each step, as ``DynamicCache(kv)``
    does, copies the whole cache twice per layer per step (its constructor and its ``update`` both concatenate):
    a third of the decode time of a small model on CPU."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _BufferLayer(DynamicLayer):
        def __init__(self, keys: Any, values: Any) -> None:
            super().__init__()
            self.device, self.is_initialized, self._n = keys.device, True, keys.shape[-2]
            self._kb, self._vb = self._alloc(keys, self._n + 64), self._alloc(values, self._n + 64)
            self._kb[:, :, :self._n], self._vb[:, :, :self._n] = keys, values
            self.keys, self.values = self._kb[:, :, :self._n], self._vb[:, :, :self._n]

        @staticmethod
        def _alloc(like: Any, cap: int) -> Any:
            return like.new_empty((*like.shape[:2], cap, *like.shape[3:]))

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            t = key_states.shape[-2]
            if self._n + t > self._kb.shape[-2]:  # double the room: O(1) amortised per column
                cap = max(self._n + t, 2 * self._kb.shape[-2])
                kb, vb = self._alloc(self._kb, cap), self._alloc(self._vb, cap)
                kb[:, :, :self._n], vb[:, :, :self._n] = self.keys, self.values
                self._kb, self._vb = kb, vb
            self._kb[:, :, self._n:self._n + t] = key_states
            self._vb[:, :, self._n:self._n + t] = value_states
            self._n += t
            self.keys, self.values = self._kb[:, :, :self._n], self._vb[:, :, :self._n]
            return self.keys, self.values

    cache = DynamicCache()
    cache.layers = [_BufferLayer(k, v) for k, v in kv]
    return cache


class PrefixCache:
    """KV of prompt prefixes, by whole blocks of ``block`` tokens, least recently used evicted past ``max_bytes``.

    ``insert(ids, kv)`` keeps the KV of the longest whole-block prefix of ``ids`` that leaves at least one token
    to compute (the last prompt token's logits start generation); ``lookup(ids)`` returns ``(n, kv)`` for the
    longest cached prefix of ``ids`` (``n`` tokens, whole blocks) or None. Blocks are found by a chained hash
    and the tokens checked, so a hash collision cannot serve another prompt's cache."""

    def __init__(self, max_bytes: int, block: int = 16):
        from collections import OrderedDict

        self.max_bytes, self.block = max_bytes, block
        self._entries: OrderedDict[int, tuple[tuple[int, ...], list[tuple[Any, Any]], int, list[int]]] = OrderedDict()
        self._index: dict[int, int] = {}  # block-chain hash -> entry key (the entry holds that prefix)
        self.bytes = 0
        self.hits = self.lookups = 0

    def _chain(self, ids: Sequence[int], n_blocks: int) -> list[int]:
        out, h = [], 0
        for k in range(n_blocks):
            h = hash((h, tuple(ids[k * self.block:(k + 1) * self.block])))
            out.append(h)
        return out

    def lookup(self, ids: Sequence[int]):
        self.lookups += 1
        chain = self._chain(ids, (len(ids) - 1) // self.block)
        for k in range(len(chain) - 1, -1, -1):
            key = self._index.get(chain[k])
            if key is None:
                continue
            tokens, kv, _, _ = self._entries[key]
            n = (k + 1) * self.block
            if tuple(ids[:n]) != tokens[:n]:
                continue
            self._entries.move_to_end(key)
            self.hits += 1
            return n, [(k_[:, :, :n], v_[:, :, :n]) for k_, v_ in kv]
        return None

    def insert(self, ids: Sequence[int], kv: list[tuple[Any, Any]]) -> None:
        n_blocks = (len(ids) - 1) // self.block
        if n_blocks <= 0:
            return
        n = n_blocks * self.block
        chain = self._chain(ids, n_blocks)
        key = chain[-1]
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        kv = [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in kv]
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes:
            return
        while self._entries and self.bytes + size > self.max_bytes:
            old, (_, _, old_size, old_chain) = self._entries.popitem(last=False)
            self.bytes -= old_size
            for h in old_chain:
                if self._index.get(h) == old:
                    del self._index[h]
        self._entries[key] = (tuple(ids[:n]), kv, size, chain)
        self.bytes += size
        for h in chain:
            self._index[h] = key


class HFEngine:
    """Continuous-batching generation on a transformers causal LM (see the module doc)."""

    backend = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.005,
        max_queue: int = 64,
        max_model_len: int | None = None,
        seed: int = 0,
        on_batch: Callable[[int, int, float], None] | None = None,
        prefix_cache_mb: float = 0.0,
        prefix_block_tokens: int = 16,
    ):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.admit_wait_s = max(4 * batch_wait_timeout_s, 0.02)
        """Longest a sequence waits to join a running batch while fewer than half a batch are waiting."""
        self.max_queue = max_queue
        ctx = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len, ctx) if max_model_len else ctx
        self.on_batch = on_batch
        self._rng = random.Random(seed)
        self.stop_token_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._inbox: queue.Queue[_Seq] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # sequences accepted and not finished (running + waiting)
        self._running = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._torch = torch
        self._token_text: dict[int, str] = {}
        self._step_lock = threading.Lock()  # held by the scheduler for each step; weight updates take it
        self.weights_version = 0
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.think_id, self.end_think_id = token_id(tokenizer, THINK), token_id(tokenizer, END_THINK)
        self._grammars: Any = None  # r1ray.infer.guided.GrammarCache, made on the first guided request
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20), prefix_block_tokens) if prefix_cache_mb else None
        self.prefix_stats = {"prefill_tokens": 0, "cached_tokens": 0, "shared_tokens": 0}
        """Prompt tokens prefilled, those whose KV came from the prefix cache, and those computed once for several
        identical prompts of one batch (``n > 1``, GRPO groups); read by metrics and benchmarks."""
        self._bitmask: dict[str, Any] = {}

    def compile_guidance(self, guidance: Guidance) -> Any:
        """The compiled grammar of ``guidance`` (cached); ``ValueError`` naming the problem if it is invalid."""
        from r1ray.infer.guided import GrammarCache

        if self._grammars is None:
            self._grammars = GrammarCache(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._grammars.compile(guidance)

    def _steer(self, params: SamplingParams) -> Any:
        if params.guidance is None and params.thinking_budget is None:
            return None
        from r1ray.infer.guided import Steer

        if params.thinking_budget is not None and self.end_think_id is None:
            raise ValueError("thinking_budget: this model's tokenizer has no </think> token")
        compiled = self.compile_guidance(params.guidance) if params.guidance is not None else None
        json_like = params.guidance is not None and params.guidance.kind in ("json_schema", "json_object", "tool_call")
        return Steer(compiled, think_id=self.think_id, end_think_id=self.end_think_id,
                     budget=params.thinking_budget, starts_in_thinking=params.starts_in_thinking,
                     banned_tokens=self._grammars.control_tokens() if json_like else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(
        cls, path: str | Path, *, device: str = "auto", dtype: str = "auto", torch_threads: int | None = None,
        **kwargs: Any,
    ) -> HFEngine:
        """Load weights (safetensors only) and tokenizer from a Hugging Face directory."""
        import torch

        from r1ray.model.build import load_model
        from r1ray.model.tokenizer import load_tokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        dev, dt = _device_and_dtype(device, dtype)
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        tok = load_tokenizer(path)
        model = load_model(path, dtype=dt).to(dev)
        log.info("HF engine: %s on %s (%s), %d threads", path, dev, str(dt).replace("torch.", ""),
                 torch.get_num_threads())
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------ public API
    def load(self) -> dict[str, int]:
        """Sequences running in the batch and waiting to join it."""
        with self._lock:
            return {"running": self._running, "waiting": self._pending - self._running, "pending": self._pending}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="r1ray-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[StepEvent], None],
               *, reserve: int = 1, stream_text: bool = True) -> _Seq:
        """Queue one sequence; ``sink`` gets its events on the scheduler thread. Raises EngineFullError.

        ``stream_text=False`` (``generate``): without stop strings the text is decoded once when the sequence
        ends, in its last event, instead of token by token (two tokenizer calls per token saved)."""
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = next((t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        check_params(params, self.vocab_size)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"of {self.max_model_len} tokens"
            )
        steer = self._steer(params)  # compiles the grammar (ValueError for an invalid one) before taking a slot
        with self._lock:
            if self._pending + reserve > self.max_queue:
                raise EngineFullError(f"engine full ({self._pending} of {self.max_queue} sequences)")
            self._pending += 1
        seq = _Seq(list(prompt_ids), params, sink)
        seq.steer = steer
        seq.lazy_text = not stream_text and not params.stop
        self.start()
        self._inbox.put(seq)
        return seq

    def reserve(self, n: int) -> None:
        """Raise EngineFullError unless ``n`` more sequences fit now (checked before submitting a group)."""
        with self._lock:
            if self._pending + n > self.max_queue:
                raise EngineFullError(f"engine full ({self._pending} of {self.max_queue} sequences, {n} asked)")

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[StepEvent]:
        """Async events of one sequence; closing or cancelling the iterator cancels the sequence."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StepEvent] = asyncio.Queue()
        seq = self.submit(prompt_ids, params, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 ) -> list[Completion]:
        """Generate for every prompt (batched together), blocking; the direct in-process API."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        done = threading.Semaphore(0)
        results: list[list[StepEvent]] = [[] for _ in prompts]
        ids_list = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        t0 = time.perf_counter()
        ttft = [0.0] * len(prompts)
        latency = [0.0] * len(prompts)

        def sink_for(i: int):
            def sink(ev: StepEvent) -> None:
                if not results[i]:
                    ttft[i] = time.perf_counter() - t0
                results[i].append(ev)
                if ev.finish_reason is not None:
                    latency[i] = time.perf_counter() - t0
                    done.release()
            return sink

        self.reserve(len(prompts))
        for i, (ids, p) in enumerate(zip(ids_list, plist, strict=False)):
            self.submit(ids, p, sink_for(i), stream_text=False)
        for _ in prompts:
            done.acquire()
        out = []
        for i, evs in enumerate(results):
            out.append(Completion(
                text="".join(e.text for e in evs),
                token_ids=[t for e in evs for t in e.token_ids],
                prompt_token_ids=ids_list[i],
                finish_reason=evs[-1].finish_reason or "stop",
                logprobs=[lp for e in evs for lp in e.logprobs],
                prompt_logprobs=evs[0].prompt_logprobs,
                ttft_s=ttft[i],
                latency_s=latency[i],
            ))
        return out

    def update_weights(self, named_tensors: Any, version: int, *, timeout_s: float = 120.0) -> None:
        """Copy ``named_tensors`` (state-dict names) into the model in place once no sequence is running or
        waiting, so no completion mixes two policies; then ``weights_version = version``.

        Every name must exist in the model and every shape must match (a mismatch raises before anything
        is copied). Tied weights may be sent under either name."""
        torch = self._torch
        state = self.model.state_dict(keep_vars=True)
        for name, t in named_tensors.items():
            if name not in state:
                raise KeyError(f"update_weights: the model has no tensor {name!r}")
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, the model's is "
                                 f"{tuple(state[name].shape)}")
        deadline = time.perf_counter() + timeout_s
        while True:
            with self._step_lock, self._lock:
                if self._pending == 0:
                    with torch.no_grad():
                        for name, t in named_tensors.items():
                            dst = state[name]
                            dst.data.copy_(torch.as_tensor(t).to(device=dst.device, dtype=dst.dtype))
                    self.weights_version = int(version)
                    return
            if time.perf_counter() > deadline:
                raise TimeoutError(f"update_weights: the engine stayed busy for {timeout_s:.0f}s")
            time.sleep(0.005)

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        torch = self._torch
        active: list[_Seq] = []
        kv: list[tuple[Any, Any]] | None = None
        mask = None
        with torch.inference_mode():
            while not self._stop.is_set():
                held = False
                new: list[_Seq] = []
                try:
                    new = self._admit(active)
                    if not active and not new:
                        continue
                    self._step_lock.acquire()
                    held = True
                    t0 = time.perf_counter()
                    if new:
                        new, kv_new, mask_new, logits = self._prefill_isolated(new)
                        rows: list[int] = []
                        if new:
                            kv, mask = self._merge(kv, mask, kv_new, mask_new)
                            active = active + new
                            rows = list(range(len(active) - len(new), len(active)))
                        new = []
                    else:
                        active, kv, mask, logits = self._decode_isolated(active, kv, mask)
                        rows = list(range(len(active)))
                    with self._lock:
                        self._running = len(active)
                    n_tok = self._sample_and_emit([active[r] for r in rows], logits) if rows else 0
                    dt = time.perf_counter() - t0
                    if self.on_batch is not None and n_tok:
                        try:
                            self.on_batch(len(rows), n_tok, dt)
                        except Exception:  # metrics must never stop generation
                            log.exception("on_batch callback failed")
                    keep = [i for i, s in enumerate(active) if not s.done]
                    if len(keep) != len(active):
                        finished = len(active) - len(keep)
                        active = [active[i] for i in keep]
                        with self._lock:
                            self._pending -= finished
                            self._running = len(active)
                        if active:
                            kv, mask = self._select(kv, mask, keep)
                        else:
                            kv, mask = None, None
                except Exception as e:  # a failure outside any one sequence: fail the batch, keep the engine up
                    log.exception("engine step failed: %s", e)
                    for s in active + [s for s in new if s not in active]:
                        if not s.done:
                            self._fail(s, e)
                        else:
                            with self._lock:
                                self._pending -= 1
                    with self._lock:
                        self._running = 0
                    active, kv, mask = [], None, None
                finally:
                    if held:
                        self._step_lock.release()

    def _fail(self, s: _Seq, err: BaseException, *, release: bool = True) -> None:
        """End ``s`` alone with ``finish_reason="error"``; ``release`` its slot unless it is still a row of the
        running batch (the step's bookkeeping releases those)."""
        log.error("sequence failed (%d prompt tokens, %d generated): %s: %s", len(s.prompt_ids), len(s.out_ids),
                  type(err).__name__, err)
        s.done = True
        if release:
            with self._lock:
                self._pending -= 1
        try:
            s.sink(StepEvent("", [], [], finish_reason="error", first=s.first))
        except Exception:  # its consumer is gone (e.g. a closed event loop): nothing left to tell
            log.warning("could not deliver the error event of a failed sequence", exc_info=True)

    def _whole_batch(self, seqs: list[_Seq], what: str, step: Callable[[], tuple]) -> tuple | None:
        """``step()`` on the whole batch. If it raises: a lone sequence fails (no survivors: ``[], None, None,
        None``); a larger batch gives None, after a warning, and the caller retries its sequences one by one."""
        try:
            return step()
        except Exception as e:
            if len(seqs) == 1:
                self._fail(seqs[0], e)
                return [], None, None, None
            log.warning("%s of %d sequences failed (%s: %s): retrying them one by one", what, len(seqs),
                        type(e).__name__, e)
        return None

    def _prefill_isolated(self, seqs: list[_Seq]):
        """``_prefill`` of the batch; if it raises, each sequence alone, failing only those that raise again.
        Returns the surviving sequences and their merged cache, mask and last logits."""
        whole = self._whole_batch(seqs, "prefill", lambda: (seqs, *self._prefill(seqs)))
        if whole is not None:
            return whole
        ok: list[_Seq] = []
        kv = mask = logits = None
        for s in seqs:
            try:
                kv_s, mask_s, logits_s = self._prefill([s])
            except Exception as e:
                self._fail(s, e)
                continue
            ok.append(s)
            kv, mask = self._merge(kv, mask, kv_s, mask_s)
            logits = logits_s if logits is None else self._torch.cat([logits, logits_s])
        return ok, kv, mask, logits

    def _decode_isolated(self, seqs: list[_Seq], kv, mask):
        """``_decode`` of the batch; if it raises, each row alone (its slice of the cache), failing only the
        rows that raise again. Returns the surviving sequences with their cache, mask and logits."""
        torch = self._torch

        def whole_step() -> tuple:
            logits, kv_out, mask_out = self._decode(seqs, kv, mask)
            return seqs, kv_out, mask_out, logits

        whole = self._whole_batch(seqs, "decode step", whole_step)
        if whole is not None:
            return whole
        ok, parts = [], []
        for r, s in enumerate(seqs):
            kv_r = [(k[r:r + 1], v[r:r + 1]) for k, v in kv]
            try:
                parts.append(self._decode([s], kv_r, mask[r:r + 1]))
            except Exception as e:
                self._fail(s, e)
                continue
            ok.append(s)
        if not ok:
            return [], None, None, None
        logits = torch.cat([p[0] for p in parts])
        kv = [(torch.cat([p[1][i][0] for p in parts]), torch.cat([p[1][i][1] for p in parts]))
              for i in range(len(parts[0][1]))]
        kv, mask = self._select(kv, torch.cat([p[2] for p in parts]), list(range(len(ok))))
        return ok, kv, mask, logits

    def _admit(self, active: list[_Seq]) -> list[_Seq]:
        """New sequences for the batch: block briefly when idle, then gather for ``batch_wait_timeout_s``."""
        room = self.max_batch_size - len(active)
        new: list[_Seq] = []
        if room <= 0:
            return new
        if not active:
            try:
                new.append(self._inbox.get(timeout=0.1))
            except queue.Empty:
                return new
            deadline = time.perf_counter() + self.batch_wait_timeout_s
            while len(new) < room:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    new.append(self._inbox.get(timeout=left))
                except queue.Empty:
                    break
        elif not self._should_admit(len(active), room):
            return new
        while len(new) < room:
            try:
                new.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        live = []
        for s in new:
            s.done = False
            if s.cancelled:
                s.done = True
                with self._lock:
                    self._pending -= 1
                s.sink(StepEvent("", [], [], finish_reason="cancelled"))
            else:
                live.append(s)
        return live

    def _should_admit(self, n_active: int, room: int) -> bool:
        """Join a running batch in groups: each admission costs a prefill step that pauses every running
        sequence, so wait until a few are waiting (half the batch, or the room left), or the oldest has
        waited ``admit_wait_s``."""
        try:
            oldest = self._inbox.queue[0]
        except IndexError:
            return False
        waiting = self._inbox.qsize()
        return waiting >= min(room, max(1, n_active // 2)) or time.perf_counter() - oldest.t_submit >= self.admit_wait_s

    def _prefill(self, seqs: list[_Seq]):
        """Prefill ``seqs``: the KV cache (a list of per-layer (keys, values)), mask and last logits of the batch.

        Identical prompts of the batch (the ``n`` choices of a request, a GRPO group) are computed once and their
        rows repeated. With a prefix cache, a prompt whose leading blocks are cached computes only the rest."""
        uniq: dict[tuple, int] = {}  # prompt (and what its scoring asks for) -> unique row
        rows = [uniq.setdefault((tuple(s.prompt_ids), s.params.prompt_logprobs and (s.params.logprobs or 0)),
                                len(uniq)) for s in seqs]
        firsts = [seqs[rows.index(u)] for u in range(len(uniq))]
        self.prefix_stats["prefill_tokens"] += sum(len(s.prompt_ids) for s in seqs)
        self.prefix_stats["shared_tokens"] += sum(len(s.prompt_ids) for s in seqs) - sum(len(s.prompt_ids)
                                                                                         for s in firsts)
        hits: dict[int, tuple[int, Any]] = {}
        if self.prefix_cache is not None:
            for u, s in enumerate(firsts):
                if not s.params.prompt_logprobs:  # scoring needs every prompt position's logits
                    hit = self.prefix_cache.lookup(s.prompt_ids)
                    if hit is not None:
                        hits[u] = hit
        miss = [u for u in range(len(firsts)) if u not in hits]
        try:
            return self._prefill_unique(seqs, rows, firsts, hits, miss)
        finally:
            for i, s in enumerate(seqs):
                s.prompt_lp = firsts[rows[i]].prompt_lp

    def _prefill_unique(self, seqs, rows, firsts, hits, miss):
        torch = self._torch
        parts: dict[int, tuple[Any, Any, Any]] = {}  # unique row -> (kv, mask, logits) of that row alone
        if miss:
            kv, mask, logits = self._prefill_rows([firsts[u] for u in miss])
            if len(miss) == len(firsts) and not hits:
                if len(firsts) == len(seqs):
                    self._remember(firsts, kv, mask)
                    return kv, mask, logits
                self._remember(firsts, kv, mask)
                idx = torch.tensor(rows, device=mask.device)
                return ([(k.index_select(0, idx), v.index_select(0, idx)) for k, v in kv], mask.index_select(0, idx),
                        logits.index_select(0, idx))
            for j, u in enumerate(miss):
                parts[u] = ([(k[j:j + 1], v[j:j + 1]) for k, v in kv], mask[j:j + 1], logits[j:j + 1])
            self._remember([firsts[u] for u in miss], kv, mask)
        for u, (n, cached) in hits.items():
            parts[u] = self._prefill_from(firsts[u], n, cached)
            self.prefix_stats["cached_tokens"] += n * rows.count(u)
            self._remember([firsts[u]], parts[u][0], parts[u][1])
        kv = mask = None
        logits = []
        for u in rows:
            kv, mask = self._merge(kv, mask, *parts[u][:2])
            logits.append(parts[u][2])
        return kv, mask, torch.cat(logits)

    def _remember(self, seqs: list[_Seq], kv, mask) -> None:
        """Put each prompt's whole-block prefix KV into the prefix cache (rows of a left-padded batch)."""
        if self.prefix_cache is None:
            return
        t = mask.shape[1]
        for i, s in enumerate(seqs):
            n = len(s.prompt_ids)
            self.prefix_cache.insert(s.prompt_ids, [(k[i:i + 1, :, t - n:], v[i:i + 1, :, t - n:]) for k, v in kv])

    def _prefill_from(self, s: _Seq, n: int, cached: list[tuple[Any, Any]]):
        """Prefill one prompt whose first ``n`` tokens' KV is ``cached``: only the rest goes through the model."""
        torch = self._torch
        from r1ray.model.build import cache_kwargs

        total = len(s.prompt_ids)
        cache = _buffered_cache(cached)
        ids = torch.tensor([s.prompt_ids[n:]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, total), dtype=torch.long, device=self.device)
        pos = torch.arange(n, total, device=self.device)[None]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **cache_kwargs(self.model, cache))
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return kv, mask, out.logits[:, -1, :].float()

    def _prefill_rows(self, seqs: list[_Seq]):
        torch = self._torch
        from transformers import DynamicCache

        from r1ray.model.build import cache_kwargs, output_cache

        plen = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), plen), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), plen), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, plen - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, plen - len(s.prompt_ids):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        want_prompt = any(s.params.prompt_logprobs for s in seqs)
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device),
            use_cache=True, logits_to_keep=0 if want_prompt else 1, **cache_kwargs(self.model, DynamicCache()),
        )
        logits = out.logits[:, -1, :].float()
        if want_prompt:
            full = torch.log_softmax(out.logits.float(), dim=-1)
            for i, s in enumerate(seqs):
                if s.params.prompt_logprobs:
                    n = len(s.prompt_ids)
                    rows = full[i, plen - n:, :]
                    s.prompt_lp = [TokenLogprob(s.prompt_ids[0], self._tok(s.prompt_ids[0]), None)]
                    for j in range(1, n):
                        s.prompt_lp.append(self._logprob_entry(rows[j - 1], s.prompt_ids[j], s.params.logprobs or 0))
        kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]
        return kv, mask.to(self.device), logits

    def _decode(self, seqs: list[_Seq], kv, mask):
        torch = self._torch
        from r1ray.model.build import cache_kwargs

        ids = torch.tensor([[s.out_ids[-1]] for s in seqs], dtype=torch.long, device=self.device)
        mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=mask.dtype, device=mask.device)], dim=1)
        pos = mask.sum(1, keepdim=True) - 1
        # The cache of the step before, kept (its layers write each new column into spare capacity); a batch that
        # changed since (rows admitted or finished) gets a new one, built once from the tensors.
        cache = kv.cache if isinstance(kv, _KV) else _buffered_cache(kv)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
            **cache_kwargs(self.model, cache),
        )
        return out.logits[:, -1, :].float(), _KV(cache), mask

    def _merge(self, kv_a, mask_a, kv_b, mask_b):
        """Stack two batches' caches, left-padding the shorter one (masked out) to the longer length."""
        torch = self._torch
        if kv_a is None:
            return kv_b, mask_b
        ta, tb = mask_a.shape[1], mask_b.shape[1]
        t = max(ta, tb)

        def pad(x, n, dim):
            if n == 0:
                return x
            shape = list(x.shape)
            shape[dim] = n
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        kv = [
            (torch.cat([pad(ka, t - ta, 2), pad(kb, t - tb, 2)]), torch.cat([pad(va, t - ta, 2), pad(vb, t - tb, 2)]))
            for (ka, va), (kb, vb) in zip(kv_a, kv_b, strict=False)
        ]
        return kv, torch.cat([pad(mask_a, t - ta, 1), pad(mask_b, t - tb, 1)])

    def _select(self, kv, mask, keep: list[int]):
        """Keep rows ``keep`` and drop leading columns no remaining row attends to."""
        torch = self._torch
        idx = torch.tensor(keep, device=mask.device)
        mask = mask.index_select(0, idx)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        mask = mask[:, start:]
        kv = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in kv]
        return kv, mask

    def _tok(self, tid: int) -> str:
        t = self._token_text.get(tid)
        if t is None:
            t = self._token_text[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return t

    def _logprob_entry(self, lp_row, tid: int, top: int) -> TokenLogprob:
        entry = TokenLogprob(tid, self._tok(tid), float(lp_row[tid]))
        if top > 0:
            vals, idx = lp_row.topk(top)
            entry.top = [(int(i), self._tok(int(i)), float(v)) for v, i in zip(vals, idx, strict=False)]
        return entry

    def _sample_and_emit(self, seqs: list[_Seq], logits) -> int:
        torch = self._torch
        need_lp = any(s.params.logprobs is not None for s in seqs)
        logp = None
        if need_lp:  # processed_logprobs rows: the distribution sampled from, at the row's temperature
            temps = [s.params.temperature if s.params.processed_logprobs and s.params.temperature > 0 else 1.0
                     for s in seqs]
            scaled = logits if all(t == 1.0 for t in temps) else logits / torch.tensor(
                temps, dtype=logits.dtype, device=logits.device).unsqueeze(-1)
            logp = torch.log_softmax(scaled, dim=-1)  # the model's own logprobs, before any grammar mask
        steers = [s.steer for s in seqs]
        if any(st is not None for st in steers):
            from r1ray.infer.guided import apply_masks

            masked = logits.clone()
            try:
                if apply_masks(masked, steers, self._bitmask):
                    logits = masked
            except Exception:  # a matcher failed: the rows it belongs to fail alone below
                log.exception("grammar mask failed")
                for s in seqs:
                    if s.steer is not None:
                        s.steer = _BrokenSteer()
        greedy = logits.argmax(-1).tolist()
        chosen = list(greedy)
        sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0 and not s.cancelled
                   and s.params.max_tokens > 0]
        if sampled:
            try:
                for i, tid in zip(sampled, self._sample_rows(logits, [seqs[i] for i in sampled], sampled),
                                  strict=True):
                    chosen[i] = tid
            except Exception:  # a bad row (e.g. NaN logits): sample row by row, so only that row fails below
                for i in sampled:
                    chosen[i] = -1
        n = 0
        for i, s in enumerate(seqs):
            try:
                n += self._emit_one(s, i, chosen, logits, logp)
            except Exception as e:  # this sequence's sampling or consumer failed: it alone ends
                if not s.done:
                    self._fail(s, e, release=False)  # the step's bookkeeping releases done rows of the batch
        return n

    def _emit_one(self, s: _Seq, i: int, greedy: list[int], logits, logp) -> int:
        """Send the next token of row ``i`` (``greedy[i]``: the argmax, or the token already sampled for it; -1:
        sample it here) and its event; returns the number of tokens generated."""
        if s.cancelled:
            s.done = True
            s.sink(StepEvent("", [], [], finish_reason="cancelled"))
            return 0
        p = s.params
        if p.max_tokens == 0:  # scoring only (echo + logprobs): the prompt's logprobs, nothing generated
            s.done = True
            s.first = False
            s.sink(StepEvent("", [], [], finish_reason="length", prompt_logprobs=s.prompt_lp, first=True))
            return 0
        tid = greedy[i] if greedy[i] >= 0 else self._sample(logits[i], p, s)
        if s.steer is not None:
            s.steer.advance(tid)  # raises for a token its grammar rejects: this sequence alone fails
        s.out_ids.append(tid)
        lps = [self._logprob_entry(logp[i], tid, p.logprobs)] if p.logprobs is not None else []
        finish = None
        if tid in self.stop_token_ids and not p.ignore_eos:
            finish = "stop"
        elif not s.lazy_text:
            self._detok(s)
            if p.stop:
                cut = find_stop(s.text, list(p.stop), start=s.emitted)
                if cut >= 0:
                    s.text = s.text[:cut]
                    finish = "stop"
        if finish is None and len(s.out_ids) >= p.max_tokens:
            finish = "length"
        if finish is not None and s.lazy_text:
            s.text = self._whole_text(s.out_ids[:-1] if finish == "stop" else s.out_ids)
        if finish is None:
            safe = len(s.text) - (stop_holdback(s.text, list(p.stop)) if p.stop else 0)
        else:
            safe = len(s.text)
        delta = s.text[s.emitted:safe] if safe > s.emitted else ""
        s.emitted = max(s.emitted, safe)
        ev = StepEvent(delta, [tid], lps, finish_reason=finish, first=s.first)
        if s.first:
            ev.prompt_logprobs = s.prompt_lp
            s.first = False
        s.done = finish is not None
        s.sink(ev)
        return 1

    def _whole_text(self, ids: list[int]) -> str:
        """The text ``_detok`` would have built token by token: the whole decode, less trailing tokens that leave it
        ending in an incomplete character (which incremental decoding never emits)."""
        n = len(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        while n and text.endswith("\ufffd"):
            n -= 1
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
        return text

    def _detok(self, s: _Seq) -> None:
        """Incremental detokenisation (decode a short window, not the whole sequence, every step)."""
        ids = s.out_ids
        prefix = self.tokenizer.decode(ids[s.prefix_offset:s.read_offset], skip_special_tokens=True)
        new = self.tokenizer.decode(ids[s.prefix_offset:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            s.text += new[len(prefix):]
            s.prefix_offset, s.read_offset = s.read_offset, len(ids)

    def _generator(self, s: _Seq, device: Any) -> Any:
        if s.generator is None:
            s.generator = self._torch.Generator(device=device)
            s.generator.manual_seed(s.params.seed if s.params.seed is not None else self._rng.getrandbits(63))
        return s.generator

    def _sample_rows(self, logits, seqs: list[_Seq], rows: list[int]) -> list[int]:
        """One sampled token per row, all rows at once: each row's probabilities (temperature, top-k, top-p) and one
        uniform number from the row's own generator, then inverse-CDF sampling in one ``searchsorted``. A row's
        token depends only on its logits and its generator, as when it was sampled alone."""
        torch = self._torch
        x = logits[rows] / torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype,
                                        device=logits.device)[:, None]
        for r, s in enumerate(seqs):
            if (0 < s.params.top_k < x.shape[-1]) or s.params.top_p < 1.0:
                x[r] = self._filter(x[r], s.params)
        cdf = x.softmax(-1).cumsum(-1)
        u = torch.cat([torch.rand(1, generator=self._generator(s, logits.device), device=logits.device, dtype=cdf.dtype)
                       for s in seqs])
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        return picked[:, 0].tolist()

    def _filter(self, x, p: SamplingParams):
        """Logits outside top-k / the top-p nucleus set to -inf (one row, already divided by the temperature)."""
        torch = self._torch
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = x.topk(p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = x.sort(descending=True)
            probs = sorted_x.softmax(-1)
            cum = probs.cumsum(-1)
            drop = cum - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
        return x

    def _sample(self, logits_row, p: SamplingParams, s: _Seq) -> int:
        """One row alone (the fallback of ``_sample_rows``): the same draw from the row's generator."""
        return self._sample_rows(logits_row[None], [s], [0])[0]

