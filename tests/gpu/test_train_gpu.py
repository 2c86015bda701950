"""A real training run on one GPU: ``r1ray.train.stages.pretrain.run`` (Ray Train + DeepSpeed ZeRO-2, bf16, NCCL)
on a synthetic data artifact, in the environment that broke the first GPU run (``TORCH_CUDA_ARCH_LIST=9.0a``
and no CUDA toolkit: nothing may need compiling), then the HF export loads and generates on the GPU."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture
def hostile_build_env(monkeypatch, tmp_path):
    """A Hopper image's arch setting and a CUDA_HOME without nvcc, inherited by the Ray workers."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda-toolkit"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_pretrain_bf16_on_one_gpu_then_export_generates(tiny_tokenizer_dir, tmp_path, hostile_build_env):
    import torch

    from r1ray.config import load_config
    from r1ray.data.synthetic_shards import write_data_artifact
    from r1ray.infer import SamplingParams
    from r1ray.infer.hf import HFEngine
    from r1ray.train.core.preflight import preflight
    from r1ray.train.stages.pretrain import PretrainConfig, run

    data = write_data_artifact(tmp_path / "data", tiny_tokenizer_dir, seq_len=64, train_docs=800, val_docs=80)
    cfg = load_config(PretrainConfig, [
        "run_name=gpu-smoke", f"data.path={data}", f"storage.root={tmp_path / 'out'}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.validate_with_ray_data=false", "model.preset=debug",
        "train.max_steps=30", "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_every=15",
        "train.eval_samples=32", "train.log_every=5", "checkpoint.every=15", "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16", "scaling.use_gpu=true", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        "optim.lr=3e-3", "optim.warmup_steps=3", "logging.wandb.mode=disabled", "ray.include_dashboard=false",
        "ray.num_cpus=4", "train.max_failures=0",
    ])
    # nothing to compile on this path, so the broken build environment cannot matter
    assert preflight(cfg.deepspeed, cfg.optim, use_gpu=True) == []
    result = run(cfg)
    assert result.status == "completed" and result.steps == 30
    assert result.train_loss is not None and math.isfinite(result.train_loss)
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    history = [h for h in result.worker_result.get("history", []) if h[1] is not None]
    assert history and history[-1][1] < history[0][1]  # it learned
    assert result.export_path

    eng = HFEngine.from_dir(result.export_path, device="cuda", dtype="bfloat16")
    try:
        assert next(eng.model.parameters()).device.type == "cuda"
        [out] = eng.generate(["the a of to"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert len(out.token_ids) == 12 and out.finish_reason == "length"
    finally:
        eng.shutdown()
    torch.cuda.empty_cache()
