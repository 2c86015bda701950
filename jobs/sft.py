"""Supervised fine-tuning (the R1 cold start) with Ray Train + DeepSpeed: chat conversations, loss on assistant
tokens only, held-out greedy accuracy before and after.

    python jobs/sft.py                                  # embedded default: the default pretraining export
                                                        # (trained first when missing) on arithmetic traces
    python jobs/sft.py --config configs/sft/debug.yaml
    python jobs/sft.py data.path=chats.jsonl model.init_from=<HF model directory>
"""

from r1ray.cli import main
from r1ray.pipeline.upstream import job
from r1ray.train.stages.sft import SFTConfig as CONFIG

run = job("sft")  # prepare missing upstream defaults, train, print the summary (r1ray.train.registry)

if __name__ == "__main__":
    main(CONFIG, run)
