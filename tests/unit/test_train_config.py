"""Training configs, the generated DeepSpeed config, schedules and weight-decay groups (no Ray)."""

from __future__ import annotations

import math

import pytest

from r1ray.config import ConfigError, DeepSpeedConfig, OptimConfig, load_config
from r1ray.train.core.config import grad_accumulation
from r1ray.train.core.deepspeed import ds_config
from r1ray.train.core.optim import lr_at, param_groups
from r1ray.train.stages.pretrain import PretrainConfig


def test_batch_sizes_must_split_for_every_elastic_world_size():
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, ["scaling.num_workers=[2,3]", "train.global_batch_size=16",
                                     "train.micro_batch_size=4"])
    msg = str(e.value)
    assert "train.global_batch_size=16" in msg and "workers=[3]" in msg
    assert "multiple of 24" in msg  # micro 4 x lcm(2, 3)
    cfg = load_config(PretrainConfig, ["scaling.num_workers=[2,3]", "train.global_batch_size=24",
                                       "train.micro_batch_size=4"])
    assert [grad_accumulation(cfg.train, w) for w in (2, 3)] == [3, 2]


def test_debug_yaml_is_elastic_ready():
    cfg = load_config(PretrainConfig, ["--config", "configs/pretrain/debug.yaml", "scaling.num_workers=[1,2]"])
    assert grad_accumulation(cfg.train, 1) == 2 * grad_accumulation(cfg.train, 2)


def test_run_name_must_be_a_name():
    with pytest.raises(ConfigError, match="run_name"):
        load_config(PretrainConfig, ["run_name=a/b"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_batch_arithmetic_and_zero(stage):
    c = ds_config(DeepSpeedConfig(zero_stage=stage), OptimConfig(), micro_batch_size=4, grad_accum=3,
                  world_size=2, use_gpu=False)
    assert c["train_batch_size"] == 4 * 3 * 2
    assert c["zero_optimization"]["stage"] == stage
    assert c["optimizer"]["type"] == "AdamW" and c["optimizer"]["params"]["torch_adam"] is True
    assert ("stage3_gather_16bit_weights_on_model_save" in c["zero_optimization"]) == (stage == 3)
    assert "bf16" not in c and "fp16" not in c


def test_ds_config_same_on_gpu_except_device_specific_bits():
    ds = DeepSpeedConfig(zero_stage=2, precision="bf16")
    cpu = ds_config(ds, OptimConfig(), micro_batch_size=2, grad_accum=1, world_size=4, use_gpu=False)
    gpu = ds_config(ds, OptimConfig(), micro_batch_size=2, grad_accum=1, world_size=4, use_gpu=True)
    assert gpu["optimizer"]["params"]["fused"] is True  # torch's fused AdamW: nothing to compile
    assert cpu == gpu
    assert gpu["bf16"]["enabled"] is True


def test_ds_config_offload_and_lion():
    off = ds_config(DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True), OptimConfig(),
                    micro_batch_size=1, grad_accum=1, world_size=1, use_gpu=False)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in off["optimizer"]["params"]  # offload builds DeepSpeedCPUAdam
    lion = ds_config(DeepSpeedConfig(), OptimConfig(name="lion"), micro_batch_size=1, grad_accum=1,
                     world_size=1, use_gpu=False)
    assert "optimizer" not in lion  # r1ray passes its own Lion
    lion_off = ds_config(DeepSpeedConfig(zero_stage=2, offload_optimizer=True), OptimConfig(name="lion"),
                         micro_batch_size=1, grad_accum=1, world_size=1, use_gpu=False)
    assert lion_off["optimizer"]["type"] == "Lion"
    uni = ds_config(DeepSpeedConfig(), OptimConfig(), micro_batch_size=1, grad_accum=1, world_size=1,
                    use_gpu=False, load_universal=True)
    assert uni["checkpoint"] == {"load_universal": True}


def test_schedules():
    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(o, 0, 110) == pytest.approx(0.1)
    assert lr_at(o, 9, 110) == pytest.approx(1.0)
    assert lr_at(o, 60, 110) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(o, 110, 110) == pytest.approx(0.1)
    lin = o.model_copy(update={"schedule": "linear"})
    assert lr_at(lin, 60, 110) == pytest.approx(0.55)
    const = o.model_copy(update={"schedule": "constant"})
    assert lr_at(const, 100, 110) == 1.0
    rs = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="cosine_restarts", restart_period=10)
    assert lr_at(rs, 0, 100) == 1.0 and lr_at(rs, 10, 100) == 1.0 and lr_at(rs, 20, 100) == 1.0
    assert lr_at(rs, 5, 100) == pytest.approx(0.5)
    assert all(math.isfinite(lr_at(o, s, 110)) for s in range(200))


def test_weight_decay_skips_norms_and_biases(tiny_tokenizer_dir):
    from r1ray.model import ModelConfig, build_model
    from r1ray.model.tokenizer import load_tokenizer

    model = build_model(ModelConfig(family="qwen2"), load_tokenizer(tiny_tokenizer_dir), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    skipped = [names[id(p)] for p in no_decay["params"]]
    assert any("norm" in n for n in skipped) and any("bias" in n for n in skipped)  # qwen2 has q/k/v biases
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def test_lion_matches_reference_update():
    import torch

    from r1ray.train.core.optim import Lion

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    opt.step()
    # m=0: update = sign(0.1 * g); p = p * (1 - lr*wd) - lr * update
    expected = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.05) - 0.1 * torch.tensor([1.0, -1.0, 0.0])
    assert torch.allclose(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.3, -0.1, 0.0]))


def test_zero_buckets_follow_the_model_size():
    from r1ray.train.core.deepspeed import bucket_elements

    assert bucket_elements(None) == 50_000_000  # unknown model: DeepSpeed's default
    assert bucket_elements(64) == 2_000_000  # floor
    assert bucket_elements(2048) == 2048 * 2048  # hidden² in between
    assert bucket_elements(16384) == 50_000_000  # ceiling
    c = ds_config(DeepSpeedConfig(zero_stage=3), OptimConfig(), micro_batch_size=1, grad_accum=1, world_size=2,
                  use_gpu=False, hidden_size=2048)
    z = c["zero_optimization"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == 2048 * 2048
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 2048 * 2048)
    assert z["stage3_param_persistence_threshold"] == 20480
