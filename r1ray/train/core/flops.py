"""Model FLOPs utilisation (MFU): the peak FLOP/s of known GPUs, the training FLOPs per token of a causal LM,
and ``MfuMeter``, which counts only the seconds spent in training steps.

MFU = achieved model FLOP/s / peak FLOP/s. The model FLOPs are the PaLM appendix-B estimate (6 per matmul
parameter per token for forward + backward, plus the attention scores), so activation recomputation or a
chunked loss's recomputed logits do not raise MFU: they are overhead, as in the papers that report MFU.

    meter = MfuMeter(train_flops_per_token(model, seq_len), gpu_peak_flops(name, "bf16"), world_size=8)
    meter.step(tokens=global_tokens, seconds=step_seconds)   # after each optimizer step, nothing else
    meter.mfu()                                               # None when the card or the model is unknown
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuPeak:
    """Dense (no structured sparsity) peak FLOP/s of one GPU, from NVIDIA's datasheets."""

    bf16: float | None
    """16-bit tensor-core peak (bf16, or fp16 where the card has no bf16 tensor cores: then ``bf16_ok`` is False)."""
    tf32: float | None
    """TF32 tensor-core peak; None for cards without TF32 (pre-Ampere)."""
    fp32: float
    """Plain IEEE fp32 (CUDA cores): what fp32 matmuls get unless TF32 is enabled."""
    bf16_ok: bool = True
    """False for Volta/Turing: their 16-bit tensor cores are fp16 only; bf16 runs without them."""


# Ordered: the first pattern that matches the device name wins, so specific names come before their
# prefixes (H100 PCIe / NVL before H100 SXM, A100 before A10, L40S before L40 before L4).
_PEAKS: list[tuple[str, GpuPeak]] = [
    (r"GH200", GpuPeak(bf16=989e12, tf32=494e12, fp32=67e12)),
    (r"H200\s*NVL", GpuPeak(bf16=835e12, tf32=418e12, fp32=60e12)),
    (r"H200", GpuPeak(bf16=989e12, tf32=494e12, fp32=67e12)),  # SXM
    (r"H100\s*PCIE", GpuPeak(bf16=756e12, tf32=378e12, fp32=51e12)),
    (r"H100\s*NVL", GpuPeak(bf16=835e12, tf32=418e12, fp32=60e12)),
    (r"H100", GpuPeak(bf16=989e12, tf32=494e12, fp32=67e12)),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"A100", GpuPeak(bf16=312e12, tf32=156e12, fp32=19.5e12)),
    (r"L40S", GpuPeak(bf16=362e12, tf32=183e12, fp32=91.6e12)),
    (r"L40\b", GpuPeak(bf16=181e12, tf32=90.5e12, fp32=90.5e12)),
    (r"L4\b", GpuPeak(bf16=121e12, tf32=60e12, fp32=30.3e12)),
    (r"A10G", GpuPeak(bf16=125e12, tf32=62.5e12, fp32=31.2e12)),  # NVIDIA publishes none: the A10's figures
    (r"A10\b", GpuPeak(bf16=125e12, tf32=62.5e12, fp32=31.2e12)),
    (r"V100", GpuPeak(bf16=125e12, tf32=None, fp32=15.7e12, bf16_ok=False)),
    (r"T4\b", GpuPeak(bf16=65e12, tf32=None, fp32=8.1e12, bf16_ok=False)),
]


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The datasheet peaks of ``device_name`` (``torch.cuda.get_device_name()``), or None if unknown."""
    name = device_name.upper()
    for pattern, peak in _PEAKS:
        if re.search(pattern, name):
            return peak
    return None


def tf32_enabled() -> bool:
    """Whether fp32 matmuls on CUDA may use TF32 in this process. PyTorch's default is no ("highest"):
    ``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``
    turns it on."""
    import torch

    if getattr(torch.backends.cuda.matmul, "fp32_precision", None) == "tf32":
        return True
    return torch.get_float32_matmul_precision() in ("high", "medium")


def gpu_peak_flops(device_name: str, precision: str, *, tf32: bool | None = None) -> float | None:
    """Peak dense FLOP/s of a known GPU for training in ``precision`` (``bf16``, ``fp16`` or ``fp32``).

    fp32 counts the TF32 tensor-core peak only when TF32 is on (``tf32``; None reads this process's torch
    setting, see ``tf32_enabled``), else the plain fp32 peak (H100 SXM: 67 TFLOP/s, not 494). bf16 on a card
    without bf16 tensor cores (V100, T4) and unknown cards give None: MFU is then not reported."""
    peak = gpu_peak(device_name)
    if peak is None:
        return None
    if precision in ("bf16", "fp16"):
        if precision == "bf16" and not peak.bf16_ok:
            return None
        return peak.bf16
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected bf16, fp16 or fp32")
    use_tf32 = tf32_enabled() if tf32 is None else tf32
    return peak.tf32 if use_tf32 and peak.tf32 is not None else peak.fp32


def train_flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention scores (12 x layers x hidden x seq_len),
    the PaLM appendix-B estimate (forward + backward; the full, not the causal-halved, score matrix).

    Matmul parameters: all parameters, less an untied input embedding (a lookup, no matmul). A tied
    embedding is counted once, as the output projection it also is."""
    n = sum(p.numel() for p in model.parameters())
    c = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and out is not None and emb.weight is not out.weight:
        n -= emb.weight.numel()
    attn = 0.0
    if c is not None and hasattr(c, "num_hidden_layers") and hasattr(c, "hidden_size"):
        attn = 12.0 * c.num_hidden_layers * c.hidden_size * seq_len
    return 6.0 * n + attn


class MfuMeter:
    """Throughput and MFU over training steps only: the caller passes each optimizer step's global token
    count and its wall seconds, and nothing else (evaluation and checkpoint saves stay out of the window).

    ``peak_flops`` is one device's peak (``gpu_peak_flops``); the cluster's is ``peak_flops x world_size``.
    ``window()`` returns the numbers since the previous ``window()`` and starts a new window; ``mfu()`` and
    ``tokens_per_second()`` read the current window without resetting it."""

    def __init__(self, flops_per_token: float | None, peak_flops: float | None, world_size: int = 1):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.tokens = 0
        self.seconds = 0.0
        self.steps = 0
        self.total_tokens = 0
        self.total_seconds = 0.0

    def step(self, tokens: int, seconds: float) -> None:
        """Count one training step: ``tokens`` trained on by all workers in ``seconds`` of wall time."""
        if tokens < 0 or seconds < 0:
            raise ValueError(f"tokens and seconds must be >= 0, got {tokens} and {seconds}")
        self.tokens += int(tokens)
        self.seconds += float(seconds)
        self.steps += 1
        self.total_tokens += int(tokens)
        self.total_seconds += float(seconds)

    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def mfu(self) -> float | None:
        """Achieved / peak FLOP/s over the current window; None when the model or the card is unknown or no
        step has been timed."""
        if not self.flops_per_token or not self.peak_flops or self.seconds <= 0:
            return None
        return self.tokens_per_second() * self.flops_per_token / (self.peak_flops * self.world_size)

    def window(self) -> dict[str, float | int | None]:
        """``{steps, tokens, seconds, tokens_per_second, mfu}`` of the current window; starts the next one."""
        out = {"steps": self.steps, "tokens": self.tokens, "seconds": self.seconds,
               "tokens_per_second": self.tokens_per_second(), "mfu": self.mfu()}
        self.tokens, self.seconds, self.steps = 0, 0.0, 0
        return out
