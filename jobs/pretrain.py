"""Pretrain a causal LM with Ray Train + DeepSpeed on the data stage's packed shards.

    python jobs/pretrain.py                                      # embedded default: local Ray, 2 workers
    python jobs/pretrain.py --config configs/pretrain/debug.yaml
    ray job submit -- python jobs/pretrain.py --config configs/pretrain/small.yaml
"""

from r1ray.cli import main
from r1ray.pipeline.upstream import job
from r1ray.train.stages.pretrain import PretrainConfig as CONFIG

run = job("pretrain")  # prepare missing upstream defaults, train, print the summary (r1ray.train.registry)

if __name__ == "__main__":
    main(CONFIG, run)
