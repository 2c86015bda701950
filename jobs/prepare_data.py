"""Prepare a corpus into packed, tokenized Parquet shards with a manifest (the data stage, on Ray Data).

    python jobs/prepare_data.py                                     # the default corpus -> outputs/data/default
    python jobs/prepare_data.py --config configs/prepare_data/debug.yaml
    python jobs/prepare_data.py --help
"""

from __future__ import annotations

import shlex

from r1ray.cli import main
from r1ray.data.config import PrepareDataConfig

CONFIG = PrepareDataConfig


def next_command(uri: str) -> str:
    """The command that pretrains on this artifact (a unit test loads it with PretrainConfig)."""
    return f"python jobs/pretrain.py {shlex.quote(f'data.path={uri}')}"


def run(cfg: PrepareDataConfig) -> str:
    from r1ray.data.pipeline import run as run_stage
    from r1ray.data.pipeline import summary

    uri = run_stage(cfg)
    print(summary(uri))
    print(f"next: {next_command(uri)}")
    return uri


if __name__ == "__main__":
    main(CONFIG, run)
