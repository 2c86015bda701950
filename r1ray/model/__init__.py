"""Pure torch + transformers models: presets, building, saving and loading HF directories.

Nothing here knows about Ray or DeepSpeed; every checkpoint is a directory that
``AutoModelForCausalLM.from_pretrained`` loads.
"""

from r1ray.model.build import PRESETS, ModelConfig, build_model, count_parameters, load_model, save_model

__all__ = ["ModelConfig", "PRESETS", "build_model", "count_parameters", "load_model", "save_model"]
