"""The one place that prepares a missing upstream stage.

Library stages never train or prepare what they consume: a stage whose input is unset fails in its
``plan``, naming the field. The jobs' embedded defaults (``python jobs/pretrain.py`` with no arguments,
``python jobs/sft.py``, ``python jobs/serve.py``, ``python jobs/tune.py``) come here first: each input left
unset is filled with the default artifact of the stage before, which is prepared (itself through this
module, recursively) when it is missing or incomplete.

    data (default corpus) -> pretrain (run "default") -> sft (run "sft") -> grpo (run "grpo") -> serve

``prepare(stage, cfg)`` returns the config with its inputs made explicit; ``inputs_for(stage, cfg)`` returns
just the dotted overrides (what Tune adds to every trial's base config).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["default_export", "inputs_for", "job", "prepare", "prepare_compress", "prepare_evaluate",
           "serve_model_path"]


def _with(cfg: Any, overrides: dict[str, Any]) -> Any:
    from r1ray.config import set_dotted

    if not overrides:
        return cfg
    data = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return type(cfg).model_validate(data)


def _shared(cfg: Any) -> dict[str, Any]:
    """The blocks an upstream default run inherits from the job that needs it."""
    return {"seed": cfg.seed, "storage": cfg.storage.model_dump(mode="json"), "ray": cfg.ray.model_dump(mode="json"),
            "logging": cfg.logging.model_dump(mode="json")}


def default_export(stage: str, cfg: Any) -> str:
    """The export of ``stage``'s embedded default run under ``cfg.storage``, trained first when missing."""
    from r1ray.model.export import newest_export
    from r1ray.train.registry import get_stage

    entry = get_stage(stage)
    run_dir = cfg.storage.uri("runs", entry.default_run)
    found = newest_export(run_dir)
    if found is not None:
        return found
    log.info("no %s export in %s yet: running the default %s stage first", stage, run_dir, stage)
    upstream_cfg = entry.config_class().model_validate({**_shared(cfg), "run_name": entry.default_run})
    result = entry.run_function()(prepare(stage, upstream_cfg))
    if result.export_path is None:
        raise RuntimeError(f"the default {stage} run ended {result.status} without an export ({run_dir})")
    return result.export_path


def inputs_for(stage: str, cfg: Any) -> dict[str, Any]:
    """Dotted overrides that fill ``cfg``'s unset inputs (``r1ray.train.registry``) with the upstream defaults,
    prepared if missing: a data input with the default data artifact, a model input with the default export of
    the stage the registry names, teacher traces with the traces step of the config (generated, or reused when
    the same config made them). An optional input is filled only when its ``when`` holds and, for a
    ``same_chain`` one, when every required input was filled here too (so both come from one chain)."""
    from r1ray.config import get_dotted
    from r1ray.train.registry import get_stage

    entry = get_stage(stage)
    out: dict[str, Any] = {}
    defaulted = True
    for i in entry.inputs:
        if get_dotted(cfg, i.field):
            defaulted = defaulted and not i.required
            continue
        if not i.required and ((i.when is not None and not i.when(cfg)) or (i.same_chain and not defaulted)):
            continue
        if i.kind == "data":
            from r1ray.data.pipeline import ensure_default

            out[i.field] = ensure_default(cfg.storage, cfg.ray)
        elif i.kind == "traces":
            out[i.field] = _traces(_with(cfg, out))
        else:
            out[i.field] = default_export(entry.model_from, cfg)
    return out


def _traces(cfg: Any) -> str:
    """The teacher traces of a sequence-mode distillation config (its traces step, in a Ray session)."""
    from r1ray.runtime import ray_session
    from r1ray.train.stages.distill import traces_config
    from r1ray.train.stages.traces import generate, traces_file

    with ray_session(cfg.ray):
        return traces_file(generate(traces_config(cfg)))


def prepare(stage: str, cfg: Any) -> Any:
    """``cfg`` with every unset input filled by the upstream default (see the module doc)."""
    return _with(cfg, inputs_for(stage, cfg))


def job(stage: str) -> Callable[[Any], Any]:
    """``run(cfg)`` of ``jobs/<stage>.py``: fill unset inputs with the upstream defaults, train, print the stage's
    summary, return the ``TrainResult``."""

    def run(cfg: Any) -> Any:
        from r1ray.train.registry import get_stage

        entry = get_stage(stage)
        result = entry.run_function()(prepare(stage, cfg))
        sys.stdout.write(entry.summary(result) + "\n")
        return result

    return run


def serve_model_path(cfg: Any) -> Any:
    """A ServeConfig whose ``model_path`` is set: the run's newest export, trained first when missing and
    ``train_if_missing`` is set (for the default run name, through the default pretraining run)."""
    if cfg.model_path or getattr(cfg, "variants", None):  # A/B variants name their own models
        return cfg
    from r1ray.model.export import newest_export

    run_dir = cfg.storage.uri("runs", cfg.run_name)
    found = newest_export(run_dir)
    if found is None and cfg.train_if_missing:
        from r1ray.train.registry import STAGES

        defaults = {e.name: e.default_run for e in STAGES.values()}
        stage = next((s for s, name in defaults.items() if name == cfg.run_name), None)
        if stage is None:
            raise FileNotFoundError(f"no model export in {run_dir} and run {cfg.run_name!r} is no stage's default "
                                    f"run ({defaults}); set model_path or train the run first")
        found = default_export(stage, cfg)
    if found is None:
        raise FileNotFoundError(f"no model export in {run_dir}: train it first (python jobs/pretrain.py) or set "
                                "model_path to a Hugging Face model directory")
    return cfg.model_copy(update={"model_path": found, "model_name": cfg.model_name or f"r1ray-{cfg.run_name}"})


def prepare_compress(cfg: Any) -> Any:
    """A CompressConfig ready for ``r1ray.compress.run.run``: with ``model`` unset, the default SFT run's newest
    export (trained first, through the default pretraining run, when missing); with no perplexity data or files,
    the default data artifact (the corpus of the pretraining run under that SFT model, so the tokenizers match).
    Inputs the config names are kept."""
    overrides: dict[str, Any] = {}
    if cfg.model is None:
        overrides["model"] = default_export("sft", cfg)
    ppl = cfg.eval.perplexity
    if ppl.enabled and not (ppl.data or ppl.files):
        from r1ray.data.pipeline import ensure_default

        overrides["eval.perplexity.data"] = ensure_default(cfg.storage, cfg.ray)
    return _with(cfg, overrides)


def prepare_evaluate(cfg: Any) -> Any:
    """An EvaluateConfig ready for ``r1ray.eval.run.run``: with ``model`` unset, the default pretraining run's
    newest export (trained first when missing) and, unless the perplexity suite has its own data or files, the
    default data artifact (the corpus that model was trained on, so the tokenizers match). A config that names
    its model is returned as it is."""
    if cfg.model is not None:
        return cfg
    overrides: dict[str, Any] = {"model": {"path": default_export("pretrain", cfg)}}
    if cfg.perplexity.enabled and not (cfg.perplexity.data or cfg.perplexity.files):
        from r1ray.data.pipeline import ensure_default

        overrides["perplexity.data"] = ensure_default(cfg.storage, cfg.ray)
    return _with(cfg, overrides)
