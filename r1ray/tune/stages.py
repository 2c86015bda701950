"""The registry of tunable stages: name -> (config class, run function, optional prepare), imported lazily.

A new training stage (sft, grpo, distill) becomes tunable by adding one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


def _resolve(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass(frozen=True)
class StageEntry:
    name: str
    config: str
    """``module:Class`` of the stage's config (import-light)."""
    run: str
    """``module:function`` that trains one run: ``run(cfg, *, callbacks=...) -> result`` with
    ``status``, ``val_loss``, ``train_loss``, ``export_path`` and ``checkpoint``."""
    prepare: str | None = None
    """``module:function(cfg)`` run once by the study driver before any trial (shared inputs)."""

    def config_class(self) -> Any:
        return _resolve(self.config)

    def run_function(self) -> Any:
        return _resolve(self.run)

    def prepare_function(self) -> Any:
        return _resolve(self.prepare) if self.prepare else None


def prepare_pretrain(cfg: Any) -> None:
    """Prepare the default corpus once, so concurrent trials never race to build it."""
    if cfg.data.path is None:
        from r1ray.data.pipeline import ensure_default

        ensure_default(cfg.storage, cfg.ray)


STAGES: dict[str, StageEntry] = {
    "pretrain": StageEntry(
        "pretrain", "r1ray.train.config:PretrainConfig", "r1ray.train.pretrain:run",
        prepare="r1ray.tune.stages:prepare_pretrain",
    ),
}


def get_stage(name: str) -> StageEntry:
    if name not in STAGES:
        raise ValueError(f"stage {name!r} is not tunable; choose one of {sorted(STAGES)}")
    return STAGES[name]
