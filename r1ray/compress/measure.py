"""Size on disk and CPU decode speed of a Hugging Face model directory, for the compression report.

Decode speed: a greedy loop over the model's forward with its KV cache, on fixed prompts of equal length (no
padding): one prefill, then ``n`` single-token steps, timed apart, so ``tokens/s = batch x n / decode time``
leaves prompt processing out. The p50 latency is the median wall time of a whole batch-1 request (prefill +
``n`` tokens). Medians over ``repeats``; a first short run of each shape is a warm-up.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["SpeedResult", "measure_model", "weights_bytes"]


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the model's weight files (``*.safetensors``) in ``model_dir`` (not its tokenizer or GGUF files)."""
    files = list(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    return sum(f.stat().st_size for f in files)


@dataclass
class SpeedResult:
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    """Batch size -> generated tokens per second (all sequences together), prefill excluded."""
    p50_latency_s: float = 0.0
    """Median wall time of one batch-1 request of ``new_tokens`` tokens."""


def _timed_decode(model: Any, ids: Any, n: int) -> tuple[float, float]:
    """(prefill seconds, seconds of ``n`` greedy single-token steps)."""
    import torch

    from r1ray.model.build import cache_kwargs, output_cache

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        past = output_cache(out)
        for _ in range(n):
            out = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, past))
            past = output_cache(out)
            nxt = out.logits[:, -1:].argmax(-1)
        return t1 - t0, time.perf_counter() - t1


def measure_model(model: Any, *, batch_sizes: list[int], new_tokens: int, prompt_tokens: int, repeats: int,
                  seed: int = 0) -> SpeedResult:
    """Decode speed of a loaded transformers model (see the module doc)."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
    out = SpeedResult()
    for b in batch_sizes:
        ids = torch.randint(0, vocab, (b, prompt_tokens), generator=g).to(device)
        _timed_decode(model, ids, 2)  # warm-up of this shape
        runs = [_timed_decode(model, ids, new_tokens) for _ in range(repeats)]
        out.decode_tokens_per_s[b] = b * new_tokens / statistics.median(d for _, d in runs)
        if b == 1:
            out.p50_latency_s = statistics.median(p + d for p, d in runs)
    return out
