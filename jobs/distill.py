"""Distil a frozen teacher into a smaller student with Ray Train + DeepSpeed (logit or sequence-level KD).

    python jobs/distill.py                                # embedded default: a debug-student of the default SFT
                                                          # export (trained first when missing), logit KD
    python jobs/distill.py --config configs/distill/debug.yaml distill.teacher=outputs/runs/sft/final
    python jobs/distill.py distill.mode=sequence          # fine-tune on the teacher's verified traces
"""

from r1ray.cli import main
from r1ray.pipeline.upstream import job
from r1ray.train.stages.distill import DistillConfig as CONFIG

run = job("distill")  # prepare missing upstream defaults, train, print the summary (r1ray.train.registry)

if __name__ == "__main__":
    main(CONFIG, run)
