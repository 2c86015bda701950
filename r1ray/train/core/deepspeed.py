"""The ONE place a DeepSpeed config is made: ``ds_config`` turns the typed config into the dict that
``deepspeed.initialize`` takes. No ds_config.json is ever hand-written.

CPU and GPU get the same config apart from what ``use_gpu`` implies: on CPU DeepSpeed's accelerator falls back
to gloo (the process group Ray Train created). The optimizer is chosen by ``r1ray.train.core.preflight.
choose_optimizer``: torch's AdamW (fused on GPUs) unless optimizer offload needs DeepSpeed's CPU Adam/Lion, so
the default paths compile nothing; ``build_engine`` checks an op that must be compiled before DeepSpeed tries
(``SetupError`` naming the cause and the fix). Offloaded optimizer state and parameters live in pinned host
memory on GPUs (faster copies to and from the device).
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
        "zero_optimization": _zero(ds, hidden_size, use_gpu=use_gpu),
        # the loop sets the learning rate of every step itself (r1ray.train.core.optim.lr_at)
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


def _zero(ds: DeepSpeedConfig, hidden_size: int | None = None, *, use_gpu: bool = False) -> dict[str, Any]:
    z: dict[str, Any] = {"stage": ds.zero_stage}
    bucket = bucket_elements(hidden_size)
    if ds.zero_stage >= 1:
        # sizes fixed by the model (not by timing or world size) keep the reduction order, and so the
        # float sums, the same run to run
        z.update({"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                  "overlap_comm": False, "contiguous_gradients": True})
    # page-locked host buffers make the device<->host copies of offload asynchronous; on CPU there is no
    # device to copy to (DeepSpeed's CPU accelerator ignores pinning)
    if ds.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        z["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.zero_stage == 3:
        # the HF export gathers the full weights on rank 0 at each checkpoint
        z["stage3_gather_16bit_weights_on_model_save"] = True
        z["stage3_prefetch_bucket_size"] = int(0.9 * bucket)
        if hidden_size:
            z["stage3_param_persistence_threshold"] = 10 * hidden_size  # small tensors (norms) stay whole
    return z


def optimizer_section(ds: DeepSpeedConfig, optim: OptimConfig, *, use_gpu: bool) -> dict[str, Any] | None:
    """DeepSpeed's ``optimizer`` section, or None when r1ray passes its own optimizer (Lion, no offload);
    the rules are ``r1ray.train.core.preflight.choose_optimizer``'s."""
    from r1ray.train.core.preflight import choose_optimizer

    return choose_optimizer(ds, optim, use_gpu=use_gpu).section


def build_engine(model: Any, ds: DeepSpeedConfig, optim: OptimConfig, config: dict[str, Any]):
    """``deepspeed.initialize`` with r1ray's weight-decay groups; returns the engine."""
    import deepspeed

    from r1ray.train.core.optim import Lion, param_groups

    check_ops(config)
    groups = param_groups(model, optim.weight_decay)
    optimizer = None
    if "optimizer" not in config:
        optimizer = Lion(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups if optimizer is None else None, optimizer=optimizer,
        config=config, dist_init_required=False,
    )
    return engine


def check_ops(config: dict[str, Any], *, accelerator: str | None = None) -> None:
    """Before ``deepspeed.initialize``: raise ``SetupError`` if the DeepSpeed ops this config builds cannot be
    built here (this worker's machine: the driver's preflight saw only its own), and make a
    ``TORCH_CUDA_ARCH_LIST`` DeepSpeed cannot parse (``9.0a``) parseable when a CUDA op will be built."""
    from r1ray.train.core.preflight import (
        OP_KIND,
        apply_cuda_arch_workaround,
        check_op,
        ops_for_config,
        raise_on_problems,
    )

    ops = ops_for_config(config)
    if not ops:
        return
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()._name
    if any(OP_KIND[op] == "cuda" for op in ops):
        apply_cuda_arch_workaround()
    problems = [p for op in ops for p in check_op(op, accelerator=accelerator)]
    raise_on_problems(problems, "the DeepSpeed optimizer cannot be built on this worker")


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
