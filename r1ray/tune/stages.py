"""The registry of tunable stages: name -> (config class, run function), imported lazily.

Every stage's ``run`` is ``r1ray.train.core.driver.run_stage`` with its stage class and returns a ``TrainResult``;
a new training stage becomes tunable by adding one entry here.
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
    """``module:function`` that trains one run: ``run(cfg, *, callbacks=..., run_name=..., storage_path=...)``
    returning a ``TrainResult`` (``status``, ``metrics``, ``train_loss``, ``export_path``, ``checkpoint``)."""

    def config_class(self) -> Any:
        return _resolve(self.config)

    def run_function(self) -> Any:
        return _resolve(self.run)


STAGES: dict[str, StageEntry] = {
    "pretrain": StageEntry("pretrain", "r1ray.train.stages.pretrain:PretrainConfig", "r1ray.train.stages.pretrain:run"),
    "sft": StageEntry("sft", "r1ray.train.stages.sft:SFTConfig", "r1ray.train.stages.sft:run"),
    "grpo": StageEntry("grpo", "r1ray.train.stages.grpo.stage:GRPOConfig", "r1ray.train.stages.grpo.stage:run"),
    "distill": StageEntry("distill", "r1ray.train.stages.distill:DistillConfig", "r1ray.train.stages.distill:run"),
}


def get_stage(name: str) -> StageEntry:
    if name not in STAGES:
        raise ValueError(f"stage {name!r} is not tunable; choose one of {sorted(STAGES)}")
    return STAGES[name]
