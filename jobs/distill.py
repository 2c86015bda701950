"""Distil a frozen teacher into a smaller student with Ray Train + DeepSpeed (logit or sequence-level KD).

    python jobs/distill.py                                # embedded default: a debug-student of the default SFT
                                                          # export (trained first when missing), logit KD
    python jobs/distill.py --config configs/distill/debug.yaml distill.teacher=outputs/runs/sft/final
    python jobs/distill.py distill.mode=sequence          # fine-tune on the teacher's verified traces
"""

from __future__ import annotations

from r1ray.cli import main
from r1ray.train.stages.distill import DistillConfig

CONFIG = DistillConfig


def run(cfg: DistillConfig):
    from r1ray.pipeline.upstream import prepare
    from r1ray.train.stages.distill import run as distill
    from r1ray.train.stages.distill import summary
    from r1ray.train.stages.sft import accuracy_table

    result = distill(prepare("distill", cfg))
    lines = accuracy_table(result)
    teacher = result.metrics.get("teacher_accuracy")
    if teacher is not None and result.metrics.get("accuracy") is not None:
        kept = result.metrics["accuracy"] / teacher if teacher else float("nan")
        lines.append(f"  teacher accuracy {100 * teacher:.1f}%; the student keeps {100 * kept:.0f}% of it")
    print(summary(result, lines))
    return result


if __name__ == "__main__":
    main(CONFIG, run)
