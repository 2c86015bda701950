"""The model a training stage starts from (``model.init_from``; distillation's ``distill.teacher``): one resolver,
one check and one lineage rule for every stage.

A start is a local Hugging Face directory or an object-store export (``s3://...``). Every process that reads it
(the driver's checks, each training worker, each rollout engine) reads a node-local copy
(``r1ray.model.export.localize_model``: the path itself when local). An r1ray artifact among a run's starts is
recorded in its manifest's lineage; a plain Hugging Face directory has no lineage to record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["lineage_inputs", "local_start", "start_config", "start_problems"]


def local_start(path: str) -> str:
    """A local directory holding the start ``path`` (copied once per node from an object store)."""
    from r1ray.model.export import localize_model

    return localize_model(path)


def start_problems(path: str | None, field: str, *, unset: str, tokenizer_why: str | None = None) -> list[str]:
    """Why ``path`` cannot be a stage's start, one line each naming ``field`` (empty: it can). ``unset`` says what
    to do when it is unset; ``tokenizer_why``, when given, requires a tokenizer and says why."""
    if not path:
        return [f"{field} is unset: {unset}"]
    try:
        local = Path(local_start(path))
    except (FileNotFoundError, OSError) as e:
        return [f"{field}={path!r} cannot be read: {e}"]
    if not (local / "config.json").is_file():
        return [f"{field}={path!r} is not a Hugging Face model directory (no config.json)"]
    if tokenizer_why and not (local / "tokenizer_config.json").is_file():
        return [f"{field}={path!r} holds no tokenizer (tokenizer_config.json); {tokenizer_why}"]
    return []


def start_config(path: str) -> dict[str, Any]:
    """The start's ``config.json``."""
    return json.loads((Path(local_start(path)) / "config.json").read_text())


def lineage_inputs(*paths: str | None) -> list[str]:
    """The starts that are r1ray artifacts (an export with a manifest), for the run's lineage."""
    from r1ray.artifacts import is_complete

    return [p for p in paths if p and is_complete(p)]
