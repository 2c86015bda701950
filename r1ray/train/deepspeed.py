"""The ONE place a DeepSpeed config is made: ``ds_config`` turns the typed config into the dict that
``deepspeed.initialize`` takes. No ds_config.json is ever hand-written.

CPU and GPU get the same config apart from what ``use_gpu`` implies: on CPU DeepSpeed's accelerator
falls back to gloo (the process group Ray Train created) and, with optimizer offload off, the optimizer
is ``torch.optim.AdamW`` (``torch_adam``) so no CPU-Adam op needs building; on GPUs the fused Adam.
"""

from __future__ import annotations

from typing import Any

from r1ray.config import DeepSpeedConfig, OptimConfig


def ds_config(
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    use_gpu: bool,
    load_universal: bool = False,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict. Batch sizes derive from micro x accumulation x world, so they agree;
    ZeRO's buckets derive from the model's ``hidden_size`` (see ``bucket_elements``)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "steps_per_print": 10**9,  # r1ray reports metrics itself
        "wall_clock_breakdown": False,
        "zero_optimization": _zero(ds, hidden_size),
        # the loop sets the learning rate of every step itself (r1ray.train.optim.lr_at)
        "zero_allow_untested_optimizer": True,
    }
    if ds.precision == "bf16":
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif ds.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    opt = optimizer_section(ds, optim, use_gpu=use_gpu)
    if opt is not None:
        cfg["optimizer"] = opt
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def bucket_elements(hidden_size: int | None) -> int:
    """ZeRO's gradient-reduction bucket, in elements: hidden_size² (the rule of Hugging Face's "auto"
    DeepSpeed values), kept within [2M, 50M]. A fixed 50M bucket is a 190 MiB fp32 buffer on every rank
    whatever the model (a sixth of a 125m model's per-rank state under ZeRO-3); the 2M floor keeps small
    models from paying one collective per few thousand gradients. Unknown size: 50M, DeepSpeed's default."""
    if not hidden_size:
        return 50_000_000
    return int(min(50_000_000, max(2_000_000, hidden_size * hidden_size)))


def _zero(ds: DeepSpeedConfig, hidden_size: int | None = None) -> dict[str, Any]:
    z: dict[str, Any] = {"stage": ds.zero_stage}
    bucket = bucket_elements(hidden_size)
    if ds.zero_stage >= 1:
        # sizes fixed by the model (not by timing or world size) keep the reduction order, and so the
        # float sums, the same run to run
        z.update({"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                  "overlap_comm": False, "contiguous_gradients": True})
    if ds.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        z["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        # the HF export gathers the full weights on rank 0 at each checkpoint
        z["stage3_gather_16bit_weights_on_model_save"] = True
        z["stage3_prefetch_bucket_size"] = int(0.9 * bucket)
        if hidden_size:
            z["stage3_param_persistence_threshold"] = 10 * hidden_size  # small tensors (norms) stay whole
    return z


def optimizer_section(ds: DeepSpeedConfig, optim: OptimConfig, *, use_gpu: bool) -> dict[str, Any] | None:
    """DeepSpeed's ``optimizer`` section, or None when r1ray passes its own optimizer (Lion, no offload)."""
    if optim.name == "adamw":
        params: dict[str, Any] = {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
        }
        if not ds.offload_optimizer and not use_gpu:
            params["torch_adam"] = True  # torch.optim.AdamW: no CPU-Adam build, deterministic on CPU
        return {"type": "AdamW", "params": params}
    if ds.offload_optimizer:  # DeepSpeedCPULion
        return {"type": "Lion", "params": {"lr": optim.lr, "betas": list(optim.betas),
                                           "weight_decay": optim.weight_decay}}
    return None


def build_engine(model: Any, ds: DeepSpeedConfig, optim: OptimConfig, config: dict[str, Any]):
    """``deepspeed.initialize`` with r1ray's weight-decay groups; returns the engine."""
    import deepspeed

    from r1ray.train.optim import Lion, param_groups

    groups = param_groups(model, optim.weight_decay)
    optimizer = None
    if "optimizer" not in config:
        optimizer = Lion(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups if optimizer is None else None, optimizer=optimizer,
        config=config, dist_init_required=False,
    )
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
