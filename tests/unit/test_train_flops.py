"""MFU accounting: datasheet peaks by device name and precision (TF32 honoured), FLOPs per token of a real
transformers model, and a meter that counts only the training steps it is given."""

import pytest
import torch

from r1ray.train.core.flops import MfuMeter, gpu_peak, gpu_peak_flops, tf32_enabled, train_flops_per_token


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 67e12),      # SXM
    ("NVIDIA H100 PCIe", 756e12, 51e12),
    ("NVIDIA H100 NVL", 835e12, 60e12),
    ("NVIDIA H200", 989e12, 67e12),
    ("NVIDIA H200 NVL", 835e12, 60e12),
    ("NVIDIA GH200 480GB", 989e12, 67e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 19.5e12),
    ("NVIDIA L40S", 362e12, 91.6e12),
    ("NVIDIA L40", 181e12, 90.5e12),
    ("NVIDIA L4", 121e12, 30.3e12),
    ("NVIDIA A10", 125e12, 31.2e12),
])
def test_peaks_by_device_name(name, bf16, fp32):
    assert gpu_peak_flops(name, "bf16") == bf16
    assert gpu_peak_flops(name, "fp16") == bf16
    assert gpu_peak_flops(name, "fp32", tf32=False) == fp32


def test_fp32_peak_depends_on_tf32():
    h100 = "NVIDIA H100 80GB HBM3"
    assert gpu_peak_flops(h100, "fp32", tf32=True) == 494e12
    assert gpu_peak_flops(h100, "fp32", tf32=False) == 67e12
    # cards without TF32 get the plain fp32 peak either way
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "fp32", tf32=True) == 15.7e12


def test_fp32_peak_reads_torch_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # PyTorch's default: TF32 off
        assert not tf32_enabled()
        assert gpu_peak_flops("NVIDIA H200", "fp32") == 67e12
        torch.set_float32_matmul_precision("high")
        assert tf32_enabled()
        assert gpu_peak_flops("NVIDIA H200", "fp32") == 494e12
    finally:
        torch.set_float32_matmul_precision(before)


def test_unknown_cards_and_bf16_without_tensor_cores():
    assert gpu_peak("Some Future GPU") is None
    assert gpu_peak_flops("Some Future GPU", "bf16") is None
    assert gpu_peak_flops("Tesla T4", "bf16") is None  # fp16-only tensor cores
    assert gpu_peak_flops("Tesla T4", "fp16") == 65e12
    with pytest.raises(ValueError, match="precision 'int8'"):
        gpu_peak_flops("NVIDIA H200", "int8")


def _llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def test_flops_per_token_counts_matmul_params_and_attention():
    tied, untied = _llama(True), _llama(False)
    n_tied = sum(p.numel() for p in tied.parameters())
    # 6N + 12 * layers * hidden * seq
    assert train_flops_per_token(tied, 128) == 6 * n_tied + 12 * 2 * 32 * 128
    # an untied input embedding is a lookup: the same matmul FLOPs as the tied model
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied == n_tied + 100 * 32
    assert train_flops_per_token(untied, 128) == train_flops_per_token(tied, 128)


def test_meter_counts_only_the_steps_it_is_given():
    m = MfuMeter(flops_per_token=1e9, peak_flops=1e12, world_size=2)
    assert m.mfu() is None  # nothing timed yet
    m.step(tokens=1000, seconds=1.0)
    m.step(tokens=3000, seconds=1.0)
    # a 10 s checkpoint save between steps is simply not passed in
    assert m.tokens_per_second() == 2000
    assert m.mfu() == pytest.approx(2000 * 1e9 / 2e12)
    w = m.window()
    assert w["steps"] == 2 and w["tokens"] == 4000 and w["mfu"] == pytest.approx(1.0)
    assert m.mfu() is None and m.steps == 0  # a new window
    assert m.total_tokens == 4000 and m.total_seconds == 2.0
    m.step(tokens=500, seconds=1.0)
    assert m.window()["tokens_per_second"] == 500


def test_meter_unknown_peak_and_bad_input():
    m = MfuMeter(flops_per_token=1e9, peak_flops=None)
    m.step(tokens=10, seconds=1.0)
    assert m.mfu() is None and m.tokens_per_second() == 10
    with pytest.raises(ValueError, match="seconds"):
        m.step(tokens=1, seconds=-1.0)
    with pytest.raises(ValueError, match="world_size"):
        MfuMeter(1.0, 1.0, world_size=0)
