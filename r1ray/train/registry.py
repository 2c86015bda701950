"""Every training stage, declared once: its config, its run function, the upstream artifacts it reads (and the
config field each fills), the stage whose default export it starts from, and the run name of its embedded
default. Ray Tune (``r1ray.tune``), the pipeline (``r1ray.pipeline.run``), the standalone jobs' upstream
preparation (``r1ray.pipeline.upstream``) and ``jobs/<stage>.py`` all read this one table; adding a stage is
one entry here, its module under ``r1ray.train.stages`` and a ``StageSpec`` field of its name in the pipeline's
config (``r1ray.train.stage`` lists the steps).

References are ``"module:attr"`` strings, so reading the table imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["STAGES", "Input", "StageEntry", "get_stage", "resolve"]


def resolve(ref: str) -> Any:
    """The object a ``"module:attr"`` reference names."""
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass(frozen=True)
class Input:
    """One upstream artifact a stage reads."""

    kind: str
    """``data`` (a data artifact), ``model`` (a model export) or ``traces`` (a teacher-traces artifact, made by
    ``r1ray.train.stages.traces`` from the stage's own config: the field gets its ``traces.jsonl``)."""
    field: str
    """The dotted config field it fills (``data.path``, ``model.init_from``, ``distill.teacher``)."""
    required: bool = True
    """A required input left unset fails the stage's ``plan``; an optional one is filled only when ``when``."""
    when: Callable[[Any], bool] | None = None
    """Optional inputs: filled only when this holds for the config (SFT's corpus replay when its fraction > 0)."""
    same_chain: bool = False
    """Optional inputs: a job's upstream preparation fills it only when it also filled every required input (SFT
    replays the corpus its default pretrained model was trained on, not the corpus of a model you named)."""
    within: str | None = None
    """``module:function`` from the artifact's directory to the path the field gets (a file inside it, e.g. the
    teacher traces' ``traces.jsonl``); None: the directory itself."""

    def value(self, artifact: str) -> str:
        """What ``field`` is set to for ``artifact``."""
        return resolve(self.within)(artifact) if self.within else artifact


@dataclass(frozen=True)
class StageEntry:
    name: str
    config: str
    """``module:Class`` of the stage's config."""
    run: str
    """``module:function`` that trains one run: ``run(cfg, *, callbacks=..., run_name=..., storage_path=...)``
    returning a ``TrainResult`` (``status``, ``metrics``, ``train_loss``, ``export_path``, ``checkpoint``)."""
    inputs: tuple[Input, ...]
    """What it reads, in order."""
    default_run: str
    """Run name of its embedded default (``<storage.root>/runs/<default_run>``)."""
    model_from: str | None
    """The stage whose default export fills its ``model`` input when a job leaves it unset."""
    job_summary: str
    """``module:function`` giving the text ``jobs/<stage>.py`` prints for a ``TrainResult``."""

    def config_class(self) -> Any:
        return resolve(self.config)

    def run_function(self) -> Any:
        return resolve(self.run)

    def summary(self, result: Any) -> str:
        return resolve(self.job_summary)(result)

    def wire(self, upstream: dict[str, str], cfg: Any = None) -> dict[str, Any]:
        """Dotted overrides that connect the stage to ``upstream`` artifacts (``{"data": uri, "model": uri}``):
        every required input, and each optional one whose ``when`` holds for ``cfg``."""
        return {i.field: i.value(upstream[i.kind]) for i in self.wired(upstream, cfg)}

    def wired(self, upstream: dict[str, str], cfg: Any = None) -> tuple[Input, ...]:
        """The inputs ``wire`` connects: the pipeline keys the stage on their artifacts."""
        return tuple(i for i in self.inputs if i.kind in upstream
                     and (i.required or i.when is None or (cfg is not None and i.when(cfg))))

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(i.kind for i in self.inputs if i.required)


def _replays(cfg: Any) -> bool:
    return cfg.data.replay.fraction > 0


def _sequence(cfg: Any) -> bool:
    return cfg.distill.mode == "sequence"


_PRE = "r1ray.train.stages."
STAGES: dict[str, StageEntry] = {
    "pretrain": StageEntry("pretrain", _PRE + "pretrain:PretrainConfig", _PRE + "pretrain:run",
                           (Input("data", "data.path"),), default_run="default", model_from=None,
                           job_summary=_PRE + "pretrain:summary"),
    "sft": StageEntry("sft", _PRE + "sft:SFTConfig", _PRE + "sft:run",
                      (Input("model", "model.init_from"), Input("data", "data.replay.data", False, _replays, True)),
                      default_run="sft", model_from="pretrain", job_summary=_PRE + "sft:job_summary"),
    "grpo": StageEntry("grpo", _PRE + "grpo.stage:GRPOConfig", _PRE + "grpo.stage:run",
                       (Input("model", "model.init_from"),), default_run="grpo", model_from="sft",
                       job_summary=_PRE + "grpo.stage:summary"),
    "distill": StageEntry("distill", _PRE + "distill:DistillConfig", _PRE + "distill:run",
                          (Input("model", "distill.teacher"), Input("traces", "data.path", False, _sequence,
                                                                        within=_PRE + "traces:traces_file")),
                          default_run="distill", model_from="sft",
                          job_summary=_PRE + "distill:job_summary"),
}
"""The training stages, in pipeline order."""


def get_stage(name: str) -> StageEntry:
    if name not in STAGES:
        raise ValueError(f"unknown training stage {name!r}; choose one of {sorted(STAGES)}")
    return STAGES[name]
