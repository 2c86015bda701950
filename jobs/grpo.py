"""GRPO with verifiable rewards: a DeepSpeed learner on Ray Train, rollouts from a pool of engine actors.

    python jobs/grpo.py                                       # embedded default: SFT export first if missing
    python jobs/grpo.py --config configs/grpo/debug.yaml
    python jobs/grpo.py model.init_from=outputs/runs/sft/final grpo.beta=0.04 grpo.loss_type=grpo
"""

from r1ray.cli import main
from r1ray.pipeline.upstream import job
from r1ray.train.stages.grpo.stage import GRPOConfig as CONFIG

run = job("grpo")  # prepare missing upstream defaults, train, print the summary (r1ray.train.registry)

if __name__ == "__main__":
    main(CONFIG, run)
