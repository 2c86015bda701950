"""Weight quantization of a Hugging Face model directory with torchao, through transformers' ``TorchAoConfig``.

The output is a plain Hugging Face directory: ``model.safetensors`` holds the INT8 (or FP8) weights and their
scales as flattened tensors (torchao's safetensors support, no pickle), ``config.json`` carries the
``quantization_config``, so ``AutoModelForCausalLM.from_pretrained`` (and so ``r1ray.model.load_model``,
``HFEngine.from_dir`` and the Serve app) rebuild the quantized modules with no r1ray-specific loader.

Why torchao and not ``torch.ao.quantization.quantize_dynamic``: both run INT8 matmuls on CPU, but the latter is
deprecated in torch 2.13 (to be removed), has no safetensors format, and measured no faster here
(``benchmarks/compress.py``, docs/compress.md); torchao's weight-only INT8 (``_weight_int8pack_mm``) was the
fastest batch-1 decode.

    from r1ray.compress.quantize import quantize_dir
    quantize_dir("outputs/runs/sft/final", "/tmp/int8", method="int8")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["fp8_supported", "quant_config", "quantize_dir"]


def fp8_supported() -> tuple[bool, str]:
    """(True, "") when this process has a CUDA GPU that runs torchao's FP8 weight-only (compute capability
    >= 8.9: Ada, Hopper, Blackwell), else (False, why)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU (FP8 weight-only needs compute capability >= 8.9)"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return False, f"GPU {torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]} < 8.9"
    return True, ""


def quant_config(method: str, *, output_head: bool = True) -> Any:
    """The transformers ``TorchAoConfig`` of ``method`` (int8, int8_dynamic, fp8); ``output_head`` includes the
    output projection (``lm_head``), which must not be tied to the input embedding (see ``quantize_dir``)."""
    from transformers import TorchAoConfig

    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        qt = Int8WeightOnlyConfig()
    elif method == "int8_dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        qt = Int8DynamicActivationInt8WeightConfig()
    elif method == "fp8":
        ok, why = fp8_supported()
        if not ok:
            raise RuntimeError(f"quantize.method=fp8: {why}; use int8 on this machine")
        from torchao.quantization import Float8WeightOnlyConfig

        qt = Float8WeightOnlyConfig()
    else:
        raise ValueError(f"quantize.method must be one of int8, int8_dynamic, fp8, got {method!r}")
    # include_input_output_embeddings lets the quantizer take lm_head (an nn.Linear); the input embedding stays
    # fp32 (transformers 5.24 + torchao 0.18 save it unquantized, and a lookup reads one row per token anyway).
    return TorchAoConfig(qt, include_input_output_embeddings=output_head)


def _untied_copy(src: str | Path, tmp: Path) -> Path:
    """``src`` saved again with its output head untied from the input embedding (a copy of the matrix)."""
    import torch

    from r1ray.model.build import load_model

    model = load_model(src, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(str(tmp), safe_serialization=True)
    return tmp


def quantize_dir(src: str | Path, out: str | Path, *, method: str = "int8", output_head: bool = True,
                 device: str = "cpu") -> Path:
    """Quantize the HF model in ``src`` and save it (safetensors, tokenizer included) to ``out``.

    Loads with the quantization config applied by transformers (the same code path a user of
    ``from_pretrained(..., quantization_config=...)`` takes), then ``save_pretrained``. With ``output_head`` a
    tied output head is untied first: transformers 5.24 drops a tied head it was asked to quantize from the
    saved file (it then reloads as random weights), while an untied one round-trips. Returns ``out``."""
    import json
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from r1ray.model.tokenizer import load_tokenizer

    qc = quant_config(method, output_head=output_head)
    dtype = torch.bfloat16 if method == "fp8" else torch.float32
    with tempfile.TemporaryDirectory(prefix="r1ray-untied-") as tmp:
        tied = json.loads((Path(src) / "config.json").read_text()).get("tie_word_embeddings", True)
        load_from = _untied_copy(src, Path(tmp)) if output_head and tied else Path(src)
        model = AutoModelForCausalLM.from_pretrained(str(load_from), quantization_config=qc, dtype=dtype,
                                                     use_safetensors=True, device_map=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(src).save_pretrained(str(out))
    n = sum(1 for m in model.modules() if type(getattr(m, "weight", None)).__name__ not in ("Parameter", "NoneType"))
    log.info("quantized %s -> %s (%s, %d modules, output head %s)", src, out, method, n,
             "quantized" if output_head else "kept")
    return out
