"""Learning-rate schedules (pure functions of the step), weight-decay parameter groups, and Lion.

The schedule is a pure function of the optimizer step, so the "scheduler state" of a checkpoint is the
step itself: a resume on any number of workers gets exactly the same learning rate.
"""

from __future__ import annotations

import math
from typing import Any

from r1ray.config import OptimConfig


def lr_at(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a ``max_steps`` run."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    t = step - cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return floor + (peak - floor) * max(0.0, 1.0 - t / span)
    if cfg.schedule == "cosine":
        frac = min(1.0, t / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    # cosine with warm restarts: each cycle of `restart_period` steps decays from peak to floor again
    frac = (t % cfg.restart_period) / cfg.restart_period
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices decay; norms, biases (any tensor with < 2 dims) do not.

    Tied embeddings appear once (``named_parameters`` deduplicates shared tensors).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lion_class():
    import torch

    class Lion(torch.optim.Optimizer):
        """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an
        interpolated momentum, decoupled weight decay. One state tensor per parameter."""

        def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
            super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(p)
                    m = state["exp_avg"]
                    if wd:
                        p.mul_(1 - lr * wd)
                    update = m.mul(b1).add_(p.grad, alpha=1 - b1).sign_()
                    p.add_(update, alpha=-lr)
                    m.mul_(b2).add_(p.grad, alpha=1 - b2)
            return loss

    return Lion


def __getattr__(name: str) -> Any:  # Lion is built lazily so importing this module does not import torch
    if name == "Lion":
        return _lion_class()
    raise AttributeError(name)
