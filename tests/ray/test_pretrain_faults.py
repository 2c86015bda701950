"""Faults on local Ray with real DeepSpeed engines: non-finite steps, SIGTERM, and a resume on fewer workers.

- Non-finite losses are skipped and counted; enough in a row stop the run with an error naming the step and
  the last good checkpoint.
- SIGTERM makes every worker checkpoint at the next step boundary and stop; rerunning the same run name on
  ONE worker (the run was on two) converts the ZeRO-2 checkpoint to DeepSpeed's universal format, keeps the
  optimizer state (the same state fingerprint before the save and after the load) and continues at the exact
  sample cursor: every sample is trained on exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1ray.train.stages.pretrain import PretrainConfig
from tests.helpers import pretrain_cfg

RAY_NUM_CPUS = 3

BASE = [
    "model.preset=debug", "train.global_batch_size=16", "train.micro_batch_size=4", "train.eval_every=0",
    "train.eval_samples=16", "train.log_every=1", "optim.lr=0.01", "optim.warmup_steps=1",
    "logging.wandb.mode=disabled", "data.validate_with_ray_data=false", "train.max_failures=0",
]


def make_cfg(data_dir: str, root: Path, *extra: str) -> PretrainConfig:
    return pretrain_cfg(BASE, data_dir, root, *extra)


def test_nonfinite_steps_are_skipped_then_stop_the_run(ray_local, data_dir, tmp_path):
    from r1ray.train.core.loop import NonFiniteLossError
    from r1ray.train.stages.pretrain import run

    cfg = make_cfg(data_dir, tmp_path, "run_name=nan", "scaling.num_workers=1", "deepspeed.zero_stage=0",
                   "train.max_steps=8", "checkpoint.every=2", "faults.nonfinite_at_steps=[2,4,5,6]",
                   "train.max_nonfinite_in_row=3", "train.log_every=2")
    with pytest.raises(NonFiniteLossError) as e:
        run(cfg)
    msg = str(e.value)
    assert "3 non-finite steps in a row, the last at step 6" in msg
    assert "checkpoint_00000004-" in msg  # the last good checkpoint
    run_dir = Path(cfg.run_dir)
    state = json.loads(next(run_dir.glob("checkpoint_00000004-*/trainer_state.json")).read_text())
    assert state["nonfinite_total"] == 2  # steps 2 and 4 skipped and counted
    # the skipped step 2 did not poison the weights: step 3's loss (the only finite one of steps 3-4, reported
    # at the step-4 checkpoint) is finite, near the initial ln(vocab) = 6
    assert 0 < state["metrics"]["train_loss"] < 6.5
    assert state["metrics"]["nonfinite_steps"] == 2


def test_sigterm_checkpoints_then_resumes_on_fewer_workers_exactly(ray_local, data_dir, tmp_path):
    from r1ray.train.stages.pretrain import run

    # (with the easy-to-hard order of the first epoch: the order is a pure function of the data, so the
    # resumed run continues it exactly)
    common = ["run_name=elastic", "train.max_steps=6", "checkpoint.every=100", "deepspeed.zero_stage=2",
              "faults.record_samples=true", "train.curriculum_epochs=1", "train.curriculum_buckets=4"]
    first = run(make_cfg(data_dir, tmp_path, *common, "scaling.num_workers=2", "faults.sigterm_at_step=3"))
    # the driver gets SIGTERM after step 3 and writes the stop request; the workers stop at the first step
    # boundary that sees it (how many steps later depends on the load)
    stopped = first.steps
    assert first.status == "preempted" and 3 <= stopped < 6 and first.samples_consumed == stopped * 16
    assert first.export_path is None and f"checkpoint_{stopped:08d}-" in first.checkpoint

    second = run(make_cfg(data_dir, tmp_path, *common, "scaling.num_workers=1"))
    w = second.worker_result
    assert second.status == "completed" and second.steps == 6 and second.world_size == 1
    assert second.samples_consumed == 6 * 16
    # the optimizer state was resharded from 2 partitions into 1, not reset
    assert w["saved_fingerprint"] > 0
    assert w["resumed_fingerprint"] == pytest.approx(w["saved_fingerprint"], rel=1e-9)
    # exactly once across the two world sizes
    per_step: dict[int, list[int]] = {}
    for f in Path(second.run_dir, "samples").glob("*.txt"):
        for line in f.read_text().splitlines():
            step, world, *idx = (int(x) for x in line.split())
            assert world == (2 if step <= stopped else 1)
            per_step.setdefault(step, []).extend(idx)
    assert sorted(per_step) == list(range(1, 7))
    assert sorted(i for v in per_step.values() for i in v) == list(range(6 * 16))
    assert second.export_path and second.val_loss < second.unigram_val_loss + 1.0
