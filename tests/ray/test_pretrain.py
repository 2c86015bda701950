"""Pretraining end to end on local Ray with real DeepSpeed engines (tiny model, tiny synthetic shards).

One uninterrupted reference run is shared: the loss falls and beats the unigram baseline, the HF export
loads with ``from_pretrained`` and gives the engine's logits; a run with a worker SIGKILLed mid-run AND
another killed in the middle of writing a checkpoint finishes with the reference's final loss, bit for
bit, having trained on every sample exactly once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from r1ray.train.stages.pretrain import PretrainConfig
from tests.helpers import pretrain_cfg

RAY_NUM_CPUS = 3  # 2 training workers + 1 for Ray Data

BASE = [
    "model.preset=debug", "train.max_steps=12", "train.global_batch_size=16", "train.micro_batch_size=4",
    "train.eval_every=6", "train.eval_samples=32", "train.log_every=3", "checkpoint.every=4",
    "checkpoint.keep=2", "optim.lr=0.01", "optim.warmup_steps=2", "deepspeed.zero_stage=2",
    "scaling.num_workers=2", "logging.wandb.mode=disabled", "faults.record_samples=true",
]


def make_cfg(data_dir: str, root: Path, *extra: str) -> PretrainConfig:
    return pretrain_cfg(BASE, data_dir, root, *extra)


@pytest.fixture(scope="module")
def reference(ray_local, data_dir, tmp_path_factory):
    from r1ray.train.stages.pretrain import run

    root = tmp_path_factory.mktemp("ref")
    return run(make_cfg(data_dir, root, "run_name=ref", "logging.wandb.mode=offline"))


def trained_samples(run_dir: str) -> dict[int, list[int]]:
    """step -> global sample indices trained on by the newest attempt that ran that step (all its ranks).

    Files are ``samples/<attempt>-rank<r>.txt`` with lines ``step world idx...``; attempts run one after
    another, so ordering them by their files' modification time orders them in time."""
    attempts: dict[str, list[Path]] = {}
    for f in Path(run_dir, "samples").glob("*.txt"):
        attempts.setdefault(f.name.split("-")[0], []).append(f)
    ordered = sorted(attempts.values(), key=lambda fs: max(f.stat().st_mtime for f in fs))
    out: dict[int, list[int]] = {}
    for files in ordered:
        seen: dict[int, list[int]] = {}
        for f in files:
            for line in f.read_text().splitlines():
                step, _world, *idx = (int(x) for x in line.split())
                seen.setdefault(step, []).extend(idx)
        out.update(seen)  # a later attempt's record of a step replaces an earlier one
    return {k: sorted(v) for k, v in out.items()}


def test_loss_falls_beats_unigram_and_export_matches_engine(reference, data_dir):
    from transformers import AutoModelForCausalLM

    from r1ray.artifacts import read_manifest
    from r1ray.train.core.checkpoint import newest_export

    r = reference
    assert r.status == "completed" and r.steps == 12 and r.samples_consumed == 12 * 16
    history = r.worker_result["history"]  # [step, train loss since the previous report, val loss]
    assert [h[0] for h in history] == [3, 4, 6, 8, 9, 12]
    assert history[0][1] > history[2][1] > history[-1][1]  # the training loss falls
    assert history[2][2] > history[-1][2]  # so does the validation loss
    assert r.val_loss < r.unigram_val_loss  # and already beats token frequencies
    # the published export: a complete "pretrain" artifact whose input is the data artifact
    assert newest_export(r.run_dir) == r.export_path
    m = read_manifest(r.export_path, stage="pretrain")
    assert m["inputs"][0]["uri"] == data_dir and m["counts"]["steps"] == 12
    # the export holds exactly the weights the workers trained (the loop's float64 checksum of the parameters)
    model = AutoModelForCausalLM.from_pretrained(r.export_path).eval()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert checksum == r.worker_result["param_checksum"]
    # W&B logged offline into the run directory
    assert list(Path(r.run_dir, "wandb").glob("offline-run-*"))
    # retention keeps the newest 2 checkpoints, each with its own complete HF export
    ckpts = sorted(p.name for p in Path(r.run_dir).glob("checkpoint_0*"))
    assert [c.split("-")[0] for c in ckpts] == ["checkpoint_00000008", "checkpoint_00000012"]


def test_sigkill_and_kill_during_save_resume_equals_uninterrupted(reference, data_dir, tmp_path):
    """Rank 1 is SIGKILLed while writing the step-4 checkpoint (nothing registered: restart from scratch),
    then rank 1 is SIGKILLed after step 10 (restart from the step-8 checkpoint). The run ends with the
    reference's final losses bit for bit, every sample trained exactly once."""
    from r1ray.train.core.checkpoint import export_is_complete, newest_checkpoint
    from r1ray.train.stages.pretrain import run

    cfg = make_cfg(data_dir, tmp_path, "run_name=faulty", "data.validate_with_ray_data=false", "faults.kill_during_save_at_step=4",
                   "faults.kill_rank=1", "faults.kill_at_step=10", "train.max_failures=3")
    r = run(cfg)
    assert r.status == "completed"
    assert r.restarts == 1  # resumed from a checkpoint once (the first restart had none and started over)
    assert r.train_loss == reference.train_loss
    assert r.val_loss == reference.val_loss
    # exactly once: the steps that count cover global samples [0, 12*16) once each
    steps = trained_samples(r.run_dir)
    assert sorted(steps) == list(range(1, 13))
    assert sorted(i for s in steps.values() for i in s) == list(range(12 * 16))
    newest = newest_checkpoint(r.run_dir)
    assert newest is not None and export_is_complete(newest + "/hf")
