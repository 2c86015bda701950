"""Weights & Biases, never required: offline unless a key is set (or the config says online), and a run
goes on without W&B when it is missing or fails, saying so in the log.
"""

from __future__ import annotations

import os
from typing import Any

from r1ray.config import WandbConfig
from r1ray.observe.log import get_logger

log = get_logger(__name__)


def resolve_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbRun:
    """A W&B run that logs from rank 0 only; every call is a no-op once W&B is unavailable."""

    def __init__(self, cfg: WandbConfig, *, name: str, run_dir: str, config: dict[str, Any], enabled: bool = True):
        self._run = None
        self.mode = resolve_mode(cfg)
        if not enabled or self.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: metrics go to Ray and Prometheus only")
            return
        try:
            os.makedirs(run_dir, exist_ok=True)
            self._run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                id=name,
                resume="allow",
                dir=run_dir,
                mode=self.mode,
                config=config,
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
            log.info("W&B %s run %s under %s", self.mode, name, run_dir)
        except Exception as e:  # noqa: BLE001 - W&B must never fail a run
            log.warning("W&B unavailable (%s: %s): continuing without it", type(e).__name__, e)
            self._run = None

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics, step=step)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B log failed (%s); disabling W&B for this run", e)
            self._run = None

    def finish(self) -> None:
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)
            self._run = None
