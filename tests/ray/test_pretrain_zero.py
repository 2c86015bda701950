"""ZeRO-3 and non-finite steps on local Ray with real DeepSpeed engines.

- ZeRO-3 on 3 workers trains, evaluates (97 validation samples: the workers hold 9, 8 and 8 micro-batches,
  and a ZeRO-3 forward is a collective, so the loop must even them out or deadlock), exports a
  consolidated HF model that loads with ``from_pretrained``, survives a SIGKILL, and resumes through
  ``checkpoint.resume_from`` under a new run name to the same final weights bit for bit.
- A non-finite loss at ZeRO-2 and ZeRO-3 is a true skip: the weights and the optimizer state after the
  skipped step equal those before it (whatever DeepSpeed's own overflow check does for fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1ray.train.stages.pretrain import PretrainConfig
from tests.helpers import pretrain_cfg

RAY_NUM_CPUS = 4  # 3 training workers + 1 for Ray Data

pytestmark = pytest.mark.slow

BASE = [
    "model.preset=debug", "train.global_batch_size=12", "train.micro_batch_size=4", "train.log_every=1",
    "optim.lr=0.01", "optim.warmup_steps=1", "logging.wandb.mode=disabled", "data.validate_with_ray_data=false",
]


@pytest.fixture(scope="module")
def data_dir(tiny_tokenizer_dir, tmp_path_factory):
    from r1ray.data.synthetic_shards import write_data_artifact

    return write_data_artifact(tmp_path_factory.mktemp("data") / "data", tiny_tokenizer_dir, seq_len=32,
                               val_docs=400)


def make_cfg(data_dir: str, root: Path, *extra: str) -> PretrainConfig:
    return pretrain_cfg(BASE, data_dir, root, *extra)


def tensors(export: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(export) / "model.safetensors"))


def test_zero3_three_workers_uneven_eval_sigkill_export_and_resume_from(ray_local, data_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from r1ray.model.export import list_checkpoints
    from r1ray.train.stages.pretrain import run

    zero3 = ["deepspeed.zero_stage=3", "scaling.num_workers=3", "train.max_steps=4", "train.eval_every=2",
             "train.eval_samples=97", "checkpoint.every=2", "checkpoint.keep=3"]
    first = run(make_cfg(data_dir, tmp_path, *zero3, "run_name=z3", "faults.kill_at_step=3", "faults.kill_rank=2"))
    assert first.status == "completed" and first.steps == 4 and first.restarts == 1
    assert first.val_loss is not None and first.val_loss < first.unigram_val_loss + 1.0
    model = AutoModelForCausalLM.from_pretrained(first.export_path)  # consolidated from 3 partitions
    assert sum(p.numel() for p in model.parameters()) > 0
    # an explicit resume_from under a new run name continues from step 2 to the same weights
    step2 = dict(list_checkpoints(first.run_dir))[2]
    second = run(make_cfg(data_dir, tmp_path, *zero3, "run_name=z3-resumed", f"checkpoint.resume_from={step2}"))
    assert second.status == "completed" and second.steps == 4
    state = json.loads((Path(second.checkpoint) / "trainer_state.json").read_text())
    assert state["samples_consumed"] == 4 * 12
    a, b = tensors(first.export_path), tensors(second.export_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second.val_loss == first.val_loss


@pytest.mark.parametrize("zero", [2, 3])
def test_a_nonfinite_step_is_a_true_skip(ray_local, data_dir, tmp_path, zero):
    import torch

    from r1ray.model.export import list_checkpoints
    from r1ray.train.stages.pretrain import run

    r = run(make_cfg(data_dir, tmp_path, f"deepspeed.zero_stage={zero}", "scaling.num_workers=1",
                     "train.global_batch_size=8", "train.max_steps=3", "train.eval_every=0",
                     "checkpoint.every=1", "checkpoint.keep=3", "faults.nonfinite_at_steps=[2]",
                     f"run_name=nan{zero}"))
    assert r.status == "completed" and r.nonfinite_steps == 1
    ckpts = dict(list_checkpoints(r.run_dir))
    before, after, later = (tensors(f"{ckpts[s]}/hf") for s in (1, 2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before), "the non-finite step changed the weights"
    assert any(not torch.equal(after[k], later[k]) for k in after), "training stopped after the skip"
    fp = [json.loads(Path(ckpts[s], "trainer_state.json").read_text())["optim_fingerprint"] for s in (1, 2)]
    assert fp[0] == fp[1], "the non-finite step changed the optimizer state"
