"""Pretrain a causal LM with Ray Train + DeepSpeed on the data stage's packed shards.

    python jobs/pretrain.py                                      # embedded default: local Ray, 2 workers
    python jobs/pretrain.py --config configs/pretrain/debug.yaml
    ray job submit -- python jobs/pretrain.py --config configs/pretrain/small.yaml
"""

from __future__ import annotations

from r1ray.cli import main
from r1ray.train.stages.pretrain import PretrainConfig

CONFIG = PretrainConfig


def run(cfg: PretrainConfig):
    from r1ray.pipeline.upstream import prepare
    from r1ray.train.stages.pretrain import run as pretrain
    from r1ray.train.stages.pretrain import summary

    result = pretrain(prepare("pretrain", cfg))
    print(summary(result))
    return result


if __name__ == "__main__":
    main(CONFIG, run)
