"""Weight quantization of a Hugging Face model directory; every export is safetensors (never pickle).

- ``int8`` (the default, for CPU serving): INT8 weights per output channel with dynamic INT8 activations,
  torch's x86/fbgemm kernels (``torch.ao.quantization.quantize_dynamic``), saved by ``r1ray.model.quantized``
  (safetensors + ``r1ray_quantization.json``) and rebuilt by ``r1ray.model.load_model``, so ``HFEngine`` and the
  Serve app load it unchanged. It was the fastest here: 2.8x fp32's decode at batch 1 and 16 on the 125m
  preset (docs/compress.md, ``benchmarks/compress.py``).
- ``int8_torchao``: torchao INT8 weight-only through transformers' ``TorchAoConfig``: a transformers-native
  directory (``from_pretrained`` reloads it anywhere torchao is installed), 2.5x smaller, but torchao 0.18's CPU
  path converts the INT8 weight to fp32 on every call, so it decodes slower than fp32 here.
- ``fp8``: torchao FP8 (e4m3) weight-only through ``TorchAoConfig``, on CUDA GPUs of compute capability >= 8.9.

``torch.ao.quantization`` is flagged deprecated in torch 2.13 (torchao is its successor), but torchao has no
CPU INT8 kernel as fast yet; ``int8_torchao`` is the switch when it does.

    from r1ray.compress.quantize import quantize_dir
    quantize_dir("outputs/runs/sft/final", "/tmp/int8", method="int8")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["METHODS", "fp8_supported", "quant_config", "quantize_dir"]

METHODS = ("int8", "int8_torchao", "fp8")


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
    """The transformers ``TorchAoConfig`` of a torchao ``method`` (int8_torchao, int8_torchao_dynamic, fp8);
    ``output_head`` includes the output projection (``lm_head``), which must not be tied to the input embedding
    (see ``quantize_dir``)."""
    from transformers import TorchAoConfig

    if method == "int8_torchao":
        from torchao.quantization import Int8WeightOnlyConfig

        qt = Int8WeightOnlyConfig()
    elif method == "int8_torchao_dynamic":  # measured in benchmarks/compress.py only (slowest here)
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        qt = Int8DynamicActivationInt8WeightConfig()
    elif method == "fp8":
        ok, why = fp8_supported()
        if not ok:
            raise RuntimeError(f"quantize.method=fp8: {why}; use int8 on this machine")
        from torchao.quantization import Float8WeightOnlyConfig

        qt = Float8WeightOnlyConfig()
    else:
        raise ValueError(f"quantize.method must be one of {', '.join(METHODS)}, got {method!r}")
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


def _quantize_int8(src: str | Path, out: Path, output_head: bool) -> Path:
    import torch

    from r1ray.model.build import load_model
    from r1ray.model.quantized import quantize_dynamic_int8, save_quantized
    from r1ray.model.tokenizer import load_tokenizer

    model = load_model(src, dtype=torch.float32).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and (output_head or m is not model.get_output_embeddings())]
    quantize_dynamic_int8(model, names)
    return save_quantized(model, load_tokenizer(src), out)


def quantize_dir(src: str | Path, out: str | Path, *, method: str = "int8", output_head: bool = True,
                 device: str = "cpu") -> Path:
    """Quantize the HF model in ``src`` and save it (safetensors, tokenizer included) to ``out``.

    ``int8``: torch dynamic INT8 saved by ``r1ray.model.quantized`` (a quantized output head gets its own INT8
    matrix; a tied input embedding stays fp32). torchao methods: loaded with the quantization config applied by
    transformers (the path of ``from_pretrained(..., quantization_config=...)``), then ``save_pretrained``; with
    ``output_head`` a tied head is untied first, because transformers 5.24 drops a tied head it was asked to
    quantize from the saved file (it then reloads as random weights), while an untied one round-trips."""
    import json
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from r1ray.model.tokenizer import load_tokenizer

    out = Path(out)
    if method == "int8":
        if device != "cpu":
            raise ValueError("quantize.method=int8 (torch dynamic INT8) runs on CPU; use fp8 on GPUs")
        _quantize_int8(src, out, output_head)
        log.info("quantized %s -> %s (int8 dynamic, output head %s)", src, out, "INT8" if output_head else "fp32")
        return out
    qc = quant_config(method, output_head=output_head)
    dtype = torch.bfloat16 if method == "fp8" else torch.float32
    with tempfile.TemporaryDirectory(prefix="r1ray-untied-") as tmp:
        tied = json.loads((Path(src) / "config.json").read_text()).get("tie_word_embeddings", True)
        load_from = _untied_copy(src, Path(tmp)) if output_head and tied else Path(src)
        model = AutoModelForCausalLM.from_pretrained(str(load_from), quantization_config=qc, dtype=dtype,
                                                     use_safetensors=True, device_map=device)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(src).save_pretrained(str(out))
    log.info("quantized %s -> %s (%s, output head %s)", src, out, method, "quantized" if output_head else "kept")
    return out
