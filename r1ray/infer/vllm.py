"""The vLLM engine slot: the same ``stream``/``generate``/``load`` interface as ``HFEngine``, on vLLM.

GPU only (vLLM's wheels are CUDA builds); ``make_engine`` falls back to the HF engine and logs why when vLLM
is not importable. Not exercised by CPU CI: the GPU suite (tests/gpu) is where it runs.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from r1ray.observe.log import get_logger
from r1ray.infer.types import Completion, EngineFullError, SamplingParams, StepEvent, TokenLogprob

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


class VLLMEngine:
    """vLLM's ``AsyncLLMEngine`` behind r1ray's engine interface (continuous batching is vLLM's own)."""

    backend = "vllm"

    def __init__(self, model_path: str, *, max_batch_size: int = 64, max_queue: int = 256,
                 max_model_len: int | None = None, dtype: str = "auto"):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from r1ray.model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model_path)
        args = AsyncEngineArgs(model=model_path, max_num_seqs=max_batch_size, max_model_len=max_model_len,
                               dtype=dtype if dtype != "auto" else "auto")
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len or self.engine.engine.model_config.max_model_len
        self._pending = 0
        self._lock = threading.Lock()

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
        pass

    def shutdown(self) -> None:
        pass

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[StepEvent]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_model_len} tokens")
        self.reserve(1)
        with self._lock:
            self._pending += 1
        vsp = VSP(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                  top_k=params.top_k if params.top_k > 0 else -1, stop=list(params.stop) or None, seed=params.seed,
                  logprobs=params.logprobs, prompt_logprobs=(params.logprobs or 0) if params.prompt_logprobs else None)
        rid = uuid.uuid4().hex
        sent_text, sent_tok, first = 0, 0, True
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), vsp, rid):
                o = out.outputs[0]
                lps = []
                for j in range(sent_tok, len(o.token_ids)):
                    tid = o.token_ids[j]
                    entry = (o.logprobs or [None] * len(o.token_ids))[j] if o.logprobs else None
                    if entry is not None:
                        lp = entry[tid]
                        top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[: params.logprobs or 0]
                        lps.append(TokenLogprob(tid, lp.decoded_token or "", lp.logprob,
                                                [(t, v.decoded_token or "", v.logprob) for t, v in top]))
                ev = StepEvent(o.text[sent_text:], list(o.token_ids[sent_tok:]), lps,
                               finish_reason=o.finish_reason if out.finished else None, first=first)
                first = False
                sent_text, sent_tok = len(o.text), len(o.token_ids)
                yield ev
                if out.finished:
                    return
        finally:
            with self._lock:
                self._pending -= 1
            await self.engine.abort(rid)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams) -> list[Completion]:
        async def one(p: Any) -> Completion:
            ids = self.encode(p) if isinstance(p, str) else list(p)
            evs = [ev async for ev in self.stream(ids, params)]
            return Completion("".join(e.text for e in evs), [t for e in evs for t in e.token_ids], ids,
                              evs[-1].finish_reason or "stop", [lp for e in evs for lp in e.logprobs], None, 0.0, 0.0)

        async def all_() -> list[Completion]:
            return list(await asyncio.gather(*(one(p) for p in prompts)))

        return asyncio.run(all_())
