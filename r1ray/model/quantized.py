"""INT8 exports with dynamic activation quantization (torch's x86/fbgemm INT8 GEMM), stored as safetensors plus a
JSON description, and rebuilt into ``torch.ao.nn.quantized.dynamic.Linear`` modules on load.

Why a format of our own: these modules hold packed weights that neither transformers nor safetensors know, and
the only built-in way to save them is pickle. Here every quantized ``nn.Linear`` ``<name>`` is stored as plain
tensors ``<name>.qweight`` (int8, out x in), ``<name>.scale`` (fp32, per output channel), ``<name>.zero_point``
(int64) and ``<name>.bias`` in ``model-r1ray-int8.safetensors``; every other tensor keeps its Hugging Face name.
``r1ray_quantization.json`` lists the quantized modules; ``config.json`` carries ``quantization_config:
{quant_method: r1ray-int8-dynamic}``. Plain ``AutoModelForCausalLM.from_pretrained`` finds no weights file it
knows and refuses the directory (rather than loading random weights); ``r1ray.model.load_model`` (and so ``HFEngine`` and the Serve app) loads it through ``load_quantized``.
CPU only (fp32 activations).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["METHOD", "QUANT_FILE", "WEIGHTS", "is_quantized_export", "load_quantized", "quantize_dynamic_int8",
           "save_quantized"]

METHOD = "r1ray-int8-dynamic"
QUANT_FILE = "r1ray_quantization.json"
WEIGHTS = "model-r1ray-int8.safetensors"
"""Not ``model.safetensors``: transformers 5.24 ignores an unknown ``quant_method`` and would load that file into
a plain model with every quantized Linear left random; without it, ``from_pretrained`` refuses the directory."""
FORMAT_VERSION = 1


def is_quantized_export(path: str | Path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def _qconfig() -> Any:
    import torch

    # per output channel: one scale per row, as torchao's and GGUF Q8_0's rows (per-tensor loses more accuracy)
    return torch.ao.quantization.per_channel_dynamic_qconfig


def quantize_dynamic_int8(model: Any, module_names: list[str]) -> Any:
    """``model`` with the named ``nn.Linear`` modules replaced by dynamic INT8 ones (in place)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch 2.13 flags the whole torch.ao.quantization namespace as deprecated
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {n: _qconfig() for n in module_names},
                                                      dtype=torch.qint8, inplace=True)


def _is_dyn_linear(mod: Any) -> bool:
    import torch

    return isinstance(mod, torch.ao.nn.quantized.dynamic.Linear)


def save_quantized(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save a model whose Linear layers were replaced by ``quantize_dynamic_int8`` (see the module doc)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if not _is_dyn_linear(mod):
            continue
        w = mod.weight()
        if w.qscheme() != torch.per_channel_affine:
            raise ValueError(f"{name}: expected per-channel INT8 weights, got {w.qscheme()}")
        tensors[f"{name}.qweight"] = w.int_repr().contiguous()
        tensors[f"{name}.scale"] = w.q_per_channel_scales().float().contiguous()
        tensors[f"{name}.zero_point"] = w.q_per_channel_zero_points().long().contiguous()
        b = mod.bias()
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().float().contiguous()
        modules[name] = {"in_features": mod.in_features, "out_features": mod.out_features, "bias": b is not None}
    if not modules:
        raise ValueError("the model has no dynamic INT8 Linear modules; quantize it with quantize_dynamic_int8 first")
    tied_head = bool(getattr(model.config, "tie_word_embeddings", False)) and "lm_head" not in modules
    for key, t in model.state_dict().items():
        if "_packed_params" in key or not isinstance(t, torch.Tensor) or t.is_quantized:
            continue
        if tied_head and key == "lm_head.weight":  # the input embedding's matrix, stored once
            continue
        owner = key.rsplit(".", 1)[0]
        if owner in modules:
            continue
        tensors[key] = t.detach().contiguous().clone()
    # one metadata key: safetensors writes the header's metadata in hash-map order, so two keys came out in either
    # order from run to run and the same weights gave different bytes (the method is in config.json)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if "lm_head" in modules:
        config.tie_word_embeddings = False  # the head is its own INT8 matrix now
    config.quantization_config = {"quant_method": METHOD, "modules": "see " + QUANT_FILE}
    try:
        config.save_pretrained(str(out))
    finally:
        del config.quantization_config
        config.tie_word_embeddings = tied
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    desc = {"method": METHOD, "format_version": FORMAT_VERSION, "weight_dtype": "qint8",
            "qscheme": "per_channel_affine", "activations": "dynamic per-tensor uint8 (fbgemm/x86)",
            "modules": modules}
    (out / QUANT_FILE).write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")
    return out


def load_quantized(path: str | Path, *, dtype: Any = None, attn_implementation: str = "sdpa") -> Any:
    """Rebuild a model saved by ``save_quantized`` (safetensors only), on CPU."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if dtype is not None and dtype != torch.float32:
        raise ValueError(f"{path} is an INT8 dynamic-quantized export ({METHOD}): it runs on CPU in float32, "
                         f"not {dtype}; serve it with dtype=float32 on CPU, or compress with quantize.method=fp8 "
                         "for GPUs")
    desc = json.loads((path / QUANT_FILE).read_text())
    if desc.get("method") != METHOD or desc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / QUANT_FILE}: method {desc.get('method')!r} version {desc.get('format_version')!r} "
                         f"is not {METHOD!r} version {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    modules = desc["modules"]
    quantize_dynamic_int8(model, list(modules))
    tensors = load_file(str(path / WEIGHTS))
    for name, info in modules.items():
        mod = model.get_submodule(name)
        if not _is_dyn_linear(mod) or (mod.in_features, mod.out_features) != (info["in_features"],
                                                                               info["out_features"]):
            raise ValueError(f"{path}: module {name} does not match {QUANT_FILE} ({info})")
        q = torch._make_per_channel_quantized_tensor(tensors.pop(f"{name}.qweight"),
                                                     tensors.pop(f"{name}.scale").double(),
                                                     tensors.pop(f"{name}.zero_point").long(), 0)
        mod.set_weight_bias(q, tensors.pop(f"{name}.bias", None))
    # The INT8 modules are set; their own state_dict entries go back in as they are (their loader needs them),
    # with the state dict's per-module version metadata (without it they take a legacy layout).
    current = model.state_dict()
    own = tuple(f"{n}." for n in modules)
    state = OrderedDict(tensors)
    state.update({k: v for k, v in current.items() if k.startswith(own)})
    state._metadata = getattr(current, "_metadata", None)  # type: ignore[attr-defined]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if "_packed_params" not in k and k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path}/{WEIGHTS} does not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()
