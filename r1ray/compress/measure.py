"""Size on disk and CPU decode speed of a Hugging Face model directory, for the compression report.

Decode speed is measured with transformers' greedy ``generate`` (no early stop) on fixed prompts:
``tokens/s = batch x (n - 1) / (t(n) - t(1))``, the time of ``n`` new tokens minus the time of the first (the
prefill), so prompt processing does not count. The p50 latency is the median wall time of a whole batch-1
request (prompt + ``n`` tokens). Medians over ``repeats``; the first call of each shape is a warm-up.
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


def _timed_generate(model: Any, ids: Any, n: int) -> float:
    import torch

    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
    return time.perf_counter() - t0


def measure_model(model: Any, *, batch_sizes: list[int], new_tokens: int, prompt_tokens: int, repeats: int,
                  seed: int = 0) -> SpeedResult:
    """Decode speed of a loaded transformers model on CPU (see the module doc)."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    out = SpeedResult()
    for b in batch_sizes:
        ids = torch.randint(0, vocab, (b, prompt_tokens), generator=g)
        _timed_generate(model, ids, 2)  # warm-up of this shape
        full, first = [], []
        for _ in range(repeats):
            first.append(_timed_generate(model, ids, 1))
            full.append(_timed_generate(model, ids, new_tokens))
        t_full, t_first = statistics.median(full), statistics.median(first)
        out.decode_tokens_per_s[b] = b * (new_tokens - 1) / max(t_full - t_first, 1e-9)
        if b == 1:
            out.p50_latency_s = t_full
    return out
