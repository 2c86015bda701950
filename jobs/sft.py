"""Supervised fine-tuning (the R1 cold start) with Ray Train + DeepSpeed: chat conversations, loss on assistant
tokens only, held-out greedy accuracy before and after.

    python jobs/sft.py                                  # embedded default: the default pretraining export
                                                        # (trained first when missing) on arithmetic traces
    python jobs/sft.py --config configs/sft/debug.yaml
    python jobs/sft.py data.path=chats.jsonl model.init_from=<HF model directory>
"""

from __future__ import annotations

from r1ray.cli import main
from r1ray.train.stages.sft import SFTConfig

CONFIG = SFTConfig


def run(cfg: SFTConfig):
    from r1ray.pipeline.upstream import prepare
    from r1ray.train.stages.sft import accuracy_table, summary
    from r1ray.train.stages.sft import run as sft

    result = sft(prepare("sft", cfg))
    print(summary(result, accuracy_table(result)))
    return result


if __name__ == "__main__":
    main(CONFIG, run)
