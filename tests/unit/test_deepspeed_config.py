"""The generated DeepSpeed config: the optimizer section follows the preflight rules, the ops DeepSpeed would
build for it agree with them, pinned offload on GPUs, and a real ``deepspeed.initialize`` takes torch's fused
AdamW from the GPU config (DeepSpeed 0.19.8 passes ``fused`` through ``torch_adam``); a worker that would
have to compile an op it cannot fails with ``SetupError`` before DeepSpeed tries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from r1ray.config import DeepSpeedConfig, OptimConfig
from r1ray.train.core import preflight as pf
from r1ray.train.core.deepspeed import check_ops, ds_config
from r1ray.train.core.preflight import SetupError, choose_optimizer, ops_for_config

ROOT = Path(__file__).resolve().parents[2]


def _cfg(ds: DeepSpeedConfig, optim: OptimConfig, use_gpu: bool) -> dict:
    return ds_config(ds, optim, micro_batch_size=2, grad_accum=3, world_size=4, use_gpu=use_gpu, hidden_size=64)


COMBOS = [(name, stage, offload, gpu) for name in ("adamw", "lion") for stage in (1, 2, 3)
          for offload in (False, True) for gpu in (False, True)]


@pytest.mark.parametrize("name, stage, offload, gpu", COMBOS)
def test_ops_deepspeed_builds_agree_with_the_rules(name, stage, offload, gpu):
    ds, optim = DeepSpeedConfig(zero_stage=stage, offload_optimizer=offload), OptimConfig(name=name)
    cfg = _cfg(ds, optim, gpu)
    assert ops_for_config(cfg) == choose_optimizer(ds, optim, use_gpu=gpu).ops
    assert cfg["train_batch_size"] == 2 * 3 * 4


def test_adamw_is_torch_fused_on_gpu_and_cpu():
    gpu = _cfg(DeepSpeedConfig(precision="bf16"), OptimConfig(lr=2e-4), True)["optimizer"]
    assert gpu == {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                               "torch_adam": True, "fused": True}}
    cpu = _cfg(DeepSpeedConfig(), OptimConfig(), False)["optimizer"]["params"]
    assert cpu["torch_adam"] is True and cpu["fused"] is True
    assert "optimizer" not in _cfg(DeepSpeedConfig(), OptimConfig(name="lion"), True)  # r1ray's Lion object


def test_offload_is_pinned_on_gpu_only():
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True)
    z_gpu = _cfg(ds, OptimConfig(), True)["zero_optimization"]
    z_cpu = _cfg(ds, OptimConfig(), False)["zero_optimization"]
    assert z_gpu["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z_gpu["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert z_cpu["offload_optimizer"]["pin_memory"] is False and z_cpu["offload_param"]["pin_memory"] is False


def test_worker_check_fails_before_deepspeed_when_an_op_cannot_be_built(monkeypatch, tmp_path):
    monkeypatch.setattr(pf, "installed_ops", lambda: ({}, None))
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja, no c++
    monkeypatch.delenv("CXX", raising=False)
    offload = _cfg(DeepSpeedConfig(zero_stage=2, offload_optimizer=True), OptimConfig(), True)
    with pytest.raises(SetupError, match="cannot be built on this worker:\n  - DeepSpeed op 'cpu_adam'.*ninja"):
        check_ops(offload, accelerator="cuda")
    check_ops(_cfg(DeepSpeedConfig(zero_stage=2), OptimConfig(), True), accelerator="cuda")  # nothing to build


def test_worker_check_sanitises_the_arch_list_for_a_cuda_op(monkeypatch, tmp_path):
    """A hand-made config asking for DeepSpeed's FusedAdam (a CUDA op): 9.0a is rewritten before the build."""
    monkeypatch.setattr(pf, "installed_ops", lambda: ({"fused_adam": 1}, "cuda"))  # prebuilt: nothing else to check
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    check_ops({"optimizer": {"type": "AdamW", "params": {}}}, accelerator="cuda")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


_INIT_SCRIPT = r"""
import json, sys, torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from r1ray.config import DeepSpeedConfig, OptimConfig
from r1ray.train.core.deepspeed import build_engine, ds_config

deepspeed.init_distributed(dist_backend="gloo")
stage = int(sys.argv[1])
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2))
ds, optim = DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-3)
# the CPU config: torch's fused AdamW has a CPU kernel, and the GPU config asks for the same optimizer
engine = build_engine(model, ds, optim, ds_config(ds, optim, micro_batch_size=1, grad_accum=1, world_size=1,
                                                  use_gpu=False, hidden_size=32))
ids = torch.randint(0, 64, (1, 8))
engine.backward(engine(input_ids=ids, labels=ids).loss)
engine.step()
inner = engine.optimizer
while not isinstance(inner, torch.optim.AdamW) and hasattr(inner, "optimizer"):
    inner = inner.optimizer
print("RESULT", json.dumps({"type": type(inner).__name__, "fused": inner.defaults.get("fused"),
                            "steps": [float(s["step"]) for s in inner.state.values()][:1]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_builds_torch_fused_adamw_from_the_config(stage):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _INIT_SCRIPT, str(stage)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res == {"type": "AdamW", "fused": True, "steps": [1.0]}
