"""The registry of tunable stages: name -> (config class, run function), imported lazily."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageEntry:
    name: str
    config: str
    """``module:Class`` of the stage's config (import-light)."""
    run: str
    """``module:function`` that trains one run: ``run(cfg, *, callbacks=...) -> result``."""

    def config_class(self) -> Any:
        mod, _, attr = self.config.partition(":")
        return getattr(importlib.import_module(mod), attr)

    def run_function(self) -> Any:
        mod, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(mod), attr)


STAGES: dict[str, StageEntry] = {
    "pretrain": StageEntry("pretrain", "r1ray.train.config:PretrainConfig", "r1ray.train.pretrain:run"),
}


def get_stage(name: str) -> StageEntry:
    if name not in STAGES:
        raise ValueError(f"stage {name!r} is not tunable; choose one of {sorted(STAGES)}")
    return STAGES[name]
