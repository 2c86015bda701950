"""Pieces the training benchmarks share (``gpu.py``, ``train_step.py``); imported as a sibling module."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The benchmark's parser: the first paragraph of its docstring ``doc`` as the description, kept as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def metrics_collector(path: str):
    """A Ray Train callback that runs in the controller and appends rank 0's reported numeric metrics to the
    JSON-lines file ``path``."""
    from ray.train.v2.api.callback import UserCallback

    class Collect(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ARG002
            if metrics:
                with open(path, "a") as f:
                    f.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")

    return Collect()


def write_json(res: dict[str, Any], path: str | None) -> None:
    """The results as JSON: written to ``path`` (and said so), or printed when there is none."""
    text = json.dumps(res, indent=2, default=str)
    if path:
        Path(path).write_text(text)
        print(f"JSON written to {path}")
    else:
        print(text)
