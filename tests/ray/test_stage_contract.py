"""A stage that is not pretraining (tests/ray/contract_stage.py: a frozen reference model, mu = 2 updates per
step, an after-update hook with state saved in checkpoints, its own metrics and normaliser) through real Ray
Train + DeepSpeed: metrics reach Ray Train reports and W&B, and a worker SIGKILLed mid-run resumes to a final
export bitwise equal to an uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1ray.config import load_config

RAY_NUM_CPUS = 3

pytestmark = pytest.mark.slow

BASE = [
    "model.preset=debug", "train.max_steps=6", "train.global_batch_size=16", "train.micro_batch_size=4",
    "train.eval_every=3", "train.log_every=2", "checkpoint.every=2", "checkpoint.keep=2", "optim.lr=0.01",
    "optim.warmup_steps=1", "deepspeed.zero_stage=2", "scaling.num_workers=2", "contract.beta=0.5",
]


def make_cfg(tokenizer_dir, root: Path, *extra: str):
    from tests.ray.contract_stage import ContractConfig

    return load_config(ContractConfig, [*BASE, f"contract.tokenizer_dir={tokenizer_dir}", f"storage.root={root}",
                                        *extra])


def tensors(export: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(export) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(ray_local, tiny_tokenizer_dir, tmp_path_factory):
    from r1ray.train.core.driver import run_stage
    from tests.ray.contract_stage import ContractStage

    root = tmp_path_factory.mktemp("contract-ref")
    return run_stage(ContractStage, make_cfg(tiny_tokenizer_dir, root, "run_name=ref", "logging.wandb.mode=offline"))


def test_a_non_pretraining_stage_runs_through_the_contract(reference):
    import torch

    from r1ray.artifacts import read_manifest

    r = reference
    assert r.status == "completed" and r.steps == 6 and r.stage == "contract"
    # the driver's plan: baselines into the result; the export is an artifact of stage "contract"
    assert r.metrics["toy_baseline"] == 1.0 and "val_loss" in r.metrics
    m = read_manifest(r.export_path, stage="contract")
    assert m["config"]["contract"]["beta"] == 0.5 and m["counts"]["steps"] == 6
    # the loss falls, and the stage's metrics reached Ray Train's reports (kept in each checkpoint's state)
    history = r.worker_result["history"]
    assert history[0][1] > history[-1][1]
    state = json.loads((Path(r.checkpoint) / "trainer_state.json").read_text())
    reported = state["metrics"]
    assert reported["contract_kl"] > 0  # the policy moved away from the frozen reference
    assert reported["contract_max_seq_loss"] >= reported["train_loss"] * 0.5
    assert reported["prompts_seen"] == 2 * 16  # a total over the 2 steps of the report window, all workers
    # mu = 2: the after-update hook ran twice per step, and its count is stage state in the checkpoint
    assert state["stage_state"] == {"updates_done": 12}
    # W&B (offline) got the stage's metrics too
    wandb_files = list(Path(r.run_dir, "wandb").glob("offline-run-*/*.wandb"))
    assert wandb_files and any(b"contract_kl" in f.read_bytes() for f in wandb_files)
    # the frozen reference stayed frozen: the export differs from the seeded init it started from
    assert any(not torch.equal(v, v * 0) for v in tensors(r.export_path).values())


def test_sigkill_mid_run_resumes_to_a_bitwise_equal_export(reference, tiny_tokenizer_dir, tmp_path):
    import torch

    from r1ray.train.core.driver import run_stage
    from tests.ray.contract_stage import ContractStage

    r = run_stage(ContractStage, make_cfg(tiny_tokenizer_dir, tmp_path, "run_name=killed", "faults.kill_at_step=3",
                                          "faults.kill_rank=1", "logging.wandb.mode=disabled"))
    assert r.status == "completed" and r.restarts == 1
    a, b = tensors(reference.export_path), tensors(r.export_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert r.train_loss == reference.train_loss and r.val_loss == reference.val_loss
    state = json.loads((Path(r.checkpoint) / "trainer_state.json").read_text())
    assert state["stage_state"] == {"updates_done": 12}  # restored from the step-2 checkpoint, not recounted
