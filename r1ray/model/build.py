"""Model presets (Llama / Qwen2 family) and the HF save/load path.

Sizes are for a 32k vocabulary (embeddings included); the tokenizer sets the real vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from r1ray.config import R1Config
from r1ray.observe.log import get_logger

log = get_logger(__name__)

PRESETS: dict[str, dict[str, int]] = {
    # ~0.3M non-embedding params: learns the default corpus in minutes on 2 CPUs.
    "debug": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # Distillation students of the presets above: about a quarter of the parameters or less (the
    # embeddings shrink with the hidden size too); test_model checks the ratio at the default vocabulary.
    "debug-student": dict(hidden_size=16, intermediate_size=44, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
    # ~0.7M non-embedding params: the default. The smallest size measured to learn written arithmetic (columns,
    # carries, long division over digit tokens) to >= 95% on one-step problems within the default pipeline's budget
    # on 2 CPUs (docs/reasoning.md).
    "mini": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    # ~3M non-embedding params.
    "tiny": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2),
    "mini-student": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
    "tiny-student": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1),
    # GPT-2-small class.
    "125m": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
    "125m-student": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6),
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16),
    # TinyLlama-shaped.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
}


class ModelConfig(R1Config):
    """The network: a preset of the Llama/Qwen2 family, or an existing Hugging Face model directory."""

    preset: str = "mini"
    """Size preset: debug, mini (the default), tiny, 125m, 350m, 1b (and their ``-student``s). Ignored when
    ``init_from`` is set."""
    family: Literal["llama", "qwen2"] = "llama"
    """Architecture family of a preset."""
    init_from: str | None = None
    """A Hugging Face model directory to start from (weights and architecture) instead of a preset."""
    max_position_embeddings: int = Field(default=2048, ge=16)
    """Longest sequence the model supports (RoPE positions)."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """RoPE base frequency."""
    tie_word_embeddings: bool = True
    """Share input and output embeddings (saves vocab x hidden parameters)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: PyTorch scaled_dot_product_attention, or the eager reference."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.init_from is None and self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r} is unknown; choose one of {sorted(PRESETS)} or set init_from")
        return self


def hf_config(cfg: ModelConfig, *, vocab_size: int, bos_token_id: int | None, eos_token_id: int | None,
              pad_token_id: int | None) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    kwargs: dict[str, Any] = dict(
        PRESETS[cfg.preset],
        vocab_size=vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attn_implementation=cfg.attn_implementation,
    )
    return (LlamaConfig if cfg.family == "llama" else Qwen2Config)(**kwargs)


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Training precision -> the torch dtype name its weights are loaded in."""


def build_model(cfg: ModelConfig, tokenizer: Any, *, seed: int | None = None, precision: str = "fp32"):
    """A fresh model from the preset (vocabulary from ``tokenizer``), or the weights in ``init_from`` loaded in
    the dtype of ``precision`` (transformers 5 would otherwise keep a bf16 export's dtype whatever the run's
    precision)."""
    import torch
    from transformers import AutoModelForCausalLM

    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    if cfg.init_from is not None:
        model = load_model(cfg.init_from, dtype=getattr(torch, PRECISION_DTYPES[precision]),
                           attn_implementation=cfg.attn_implementation)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        if seed is not None:
            torch.manual_seed(seed)
        config = hf_config(
            cfg, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    if cfg.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model: Any, *, non_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.get_input_embeddings().weight.numel()
    return n


def save_model(model: Any, tokenizer: Any | None, out_dir: str | Path) -> Path:
    """Save as a Hugging Face directory: safetensors weights, config, generation config, tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_model(path: str | Path, *, dtype: Any = None, attn_implementation: str = "sdpa"):
    """Load a Hugging Face directory (safetensors only: never unpickle weights), including r1ray's INT8
    dynamic-quantized exports (``r1ray.model.quantized``)."""
    from transformers import AutoModelForCausalLM

    from r1ray.model.export import localize_model
    from r1ray.model.quantized import is_quantized_export, load_quantized

    path = localize_model(str(path))  # an object-store export: a node-local copy
    if is_quantized_export(path):
        return load_quantized(path, dtype=dtype, attn_implementation=attn_implementation)

    kwargs: dict[str, Any] = dict(use_safetensors=True, attn_implementation=attn_implementation)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands a KV cache to ``model``'s forward: ``cache`` from transformers 5.x on (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` in transformers 5.x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
