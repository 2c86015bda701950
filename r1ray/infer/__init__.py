"""The inference layer: one engine protocol, two backends, and a pool of engine actors.

- ``r1ray.infer.types``: ``SamplingParams``, ``StepEvent``, ``Completion``, ``Engine`` (the protocol).
- ``r1ray.infer.hf.HFEngine``: continuous batching on any transformers causal LM (CPU or GPU).
- ``r1ray.infer.vllm.VLLMEngine``: vLLM on GPUs (the ``gpu`` extra).
- ``r1ray.infer.pool.EnginePool``: engines as Ray actors, used by evaluation (Ray Data batch inference),
  GRPO rollouts and anything else that needs generation off the caller's process.
- ``r1ray.infer.text``: stop strings and the ``<think>`` splitter shared by engines and the HTTP layer.

Serving (``r1ray.serve``) is the HTTP layer over these; it holds no generation code of its own.
"""

from __future__ import annotations

from typing import Any

from r1ray.infer.types import (
    Completion,
    Engine,
    EngineFullError,
    OnBatch,
    SamplingParams,
    StepEvent,
    TokenLogprob,
)
from r1ray.observe.log import get_logger

__all__ = ["Completion", "Engine", "EngineFullError", "OnBatch", "SamplingParams", "StepEvent", "TokenLogprob",
           "make_engine"]

log = get_logger(__name__)


def make_engine(
    model_path: str, *, backend: str = "hf", device: str = "auto", dtype: str = "auto",
    torch_threads: int | None = None, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005,
    max_queue: int = 64, max_model_len: int | None = None, seed: int = 0, on_batch: OnBatch | None = None,
    prefix_cache_mb: float = 0.0, prefix_block_tokens: int = 16,
) -> Any:
    """The engine for ``backend``: ``hf``, ``vllm`` (fails clearly without vLLM), or ``auto``.

    ``model_path`` may be an object-store URI (``s3://…``): it is copied to local disk first."""
    from r1ray.model.export import localize_model

    model_path = localize_model(model_path)
    if backend in ("vllm", "auto"):
        from r1ray.infer.vllm import VLLMEngine, vllm_available

        ok, why = vllm_available()
        if ok:
            return VLLMEngine(model_path, max_batch_size=max_batch_size, max_queue=max_queue,
                              max_model_len=max_model_len, dtype=dtype, seed=seed, on_batch=on_batch)
        if backend == "vllm":
            raise RuntimeError(f"engine.backend=vllm but {why}; install the 'gpu' extra on a CUDA machine "
                               "or set engine.backend=hf")
        log.info("vLLM engine skipped (%s): using the HF engine", why)
    from r1ray.infer.hf import HFEngine

    return HFEngine.from_dir(
        model_path, device=device, dtype=dtype, torch_threads=torch_threads, max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s, max_queue=max_queue, max_model_len=max_model_len, seed=seed,
        on_batch=on_batch, prefix_cache_mb=prefix_cache_mb, prefix_block_tokens=prefix_block_tokens,
    )
