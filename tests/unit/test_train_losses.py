"""Chunked losses: parity with the plain ``F.cross_entropy(logits.float(), ...)`` for the loss and the
gradients of both the hidden states and the head weight (fp32 to 1e-5, bf16 to bf16 tolerances), label
smoothing, ignore_index, every reduction; log-probabilities and entropy against log_softmax; transformers
models (tied and untied heads) through ``causal_lm_apply``, also inside a DeepSpeed ZeRO-3 engine; and
proof that no [tokens, vocab] tensor of the whole batch is ever created."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from r1ray.train.core.losses import (
    DEFAULT_CHUNK_ELEMENTS,
    causal_lm_apply,
    causal_lm_hidden,
    causal_lm_loss,
    causal_lm_token_logprobs,
    chunk_rows,
    chunked_cross_entropy,
    entropy,
    lm_head_weight,
    token_logprobs,
)

ROOT = Path(__file__).resolve().parents[2]
B, T, H, V = 3, 11, 16, 50  # 33 tokens: chunks of 7 leave a ragged last chunk


def _inputs(dtype=torch.float32, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return hidden, weight, targets


def _reference(hidden, weight, targets, **kw):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), **kw)


def _grads(loss, *tensors, upstream=None):
    if upstream is None:
        return torch.autograd.grad(loss, tensors)
    return torch.autograd.grad(loss, tensors, grad_outputs=upstream)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_plain_fp32(reduction, smoothing):
    hidden, weight, targets = _inputs()
    ref = _reference(hidden, weight, targets, reduction=reduction, label_smoothing=smoothing)
    got = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=7, label_smoothing=smoothing,
                                reduction=reduction)
    if reduction == "none":
        got = got.reshape(-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    upstream = None if reduction != "none" else torch.rand(ref.shape, generator=torch.Generator().manual_seed(1))
    ref_gh, ref_gw = _grads(ref, hidden, weight, upstream=upstream)
    gh, gw = _grads(got, hidden, weight, upstream=upstream)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5)
    # ignored positions get no gradient at all
    assert gh[targets == -100].abs().max() == 0


def test_cross_entropy_matches_plain_bf16():
    hidden, weight, targets = _inputs(torch.bfloat16)
    ref = _reference(hidden, weight, targets, reduction="sum", label_smoothing=0.1)
    got = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=7, label_smoothing=0.1)
    # the logits are the same bf16 matmul, upcast: the losses agree to fp32 summation order
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    ref_gh, ref_gw = _grads(ref, hidden, weight)
    gh, gw = _grads(got, hidden, weight)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # bf16 has 8 mantissa bits (~0.4% per rounding); the weight gradient is summed per chunk, then in fp32
    torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=2e-2, atol=2e-2 * float(ref_gh.abs().max()))
    torch.testing.assert_close(gw.float(), ref_gw.float(), rtol=2e-2, atol=2e-2 * float(ref_gw.abs().max()))


def test_default_chunk_and_every_chunk_size_agree():
    hidden, weight, targets = _inputs()
    ref = chunked_cross_entropy(hidden, weight, targets)  # default: one chunk at this size
    assert chunk_rows(V, None) == DEFAULT_CHUNK_ELEMENTS // V
    for chunk in (1, 5, 33, 1000):
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk), ref,
                                   rtol=1e-6, atol=1e-5)


def test_mean_over_all_ignored_is_nan_like_torch():
    hidden, weight, targets = _inputs()
    targets = torch.full_like(targets, -100)
    ref = _reference(hidden, weight, targets, reduction="mean")
    got = chunked_cross_entropy(hidden, weight, targets, reduction="mean")
    assert torch.isnan(ref) and torch.isnan(got)
    assert chunked_cross_entropy(hidden, weight, targets, reduction="sum") == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax(temperature):
    hidden, weight, targets = _inputs()
    logits = (hidden @ weight.t()).float() / temperature
    safe = targets.clamp(min=0)
    ref = torch.log_softmax(logits, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * (targets != -100)
    got = token_logprobs(hidden, weight, targets, 4, temperature=temperature)
    assert got.shape == targets.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))  # e.g. advantages
    for a, b in zip(_grads(got, hidden, weight, upstream=upstream), _grads(ref, hidden, weight, upstream=upstream),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_entropy_matches_reference(temperature):
    hidden, weight, _ = _inputs()
    logp = torch.log_softmax((hidden @ weight.t()).float() / temperature, -1)
    ref = -(logp.exp() * logp).sum(-1)
    got = entropy(hidden, weight, 5, temperature=temperature)
    assert got.shape == (B, T)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.rand((B, T), generator=torch.Generator().manual_seed(3))
    for a, b in zip(_grads(got, hidden, weight, upstream=upstream), _grads(ref, hidden, weight, upstream=upstream),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="reduction 'avg'"):
        chunked_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_cross_entropy(hidden, weight, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"targets have shape \(3, 10\)"):
        chunked_cross_entropy(hidden, weight, targets[:, 1:])
    with pytest.raises(ValueError, match="hidden size 16"):
        chunked_cross_entropy(hidden, weight.t(), targets)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="head weight is torch.bfloat16"):
        chunked_cross_entropy(hidden, weight.bfloat16(), targets)
    with pytest.raises(ValueError, match="label_smoothing"):
        chunked_cross_entropy(hidden, weight, targets, label_smoothing=1.5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates (autograd's backward ops too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_batch_logits():
    """The memory claim, measured without timings: the plain loss creates [tokens, vocab] tensors; the chunked
    loss's largest tensor, forward and backward, is [chunk, vocab] (or the [vocab, hidden] weight gradient)."""
    g = torch.Generator().manual_seed(0)
    n, h, v, chunk = 512, 8, 300, 64
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    with _LargestTensor() as plain:
        F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum").backward()
    with _LargestTensor() as chunked:
        chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk).backward()
    assert plain.largest >= n * v
    assert chunked.largest <= max(chunk * v, v * h)
    assert chunked.largest * 8 <= plain.largest


# ------------------------------------------------------------------------------------------------
# transformers models


def _llama(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_loss_matches_plain_model(tie):
    model = _llama(tie)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    inp, tgt = ids[:, :-1], ids[:, 1:]

    ref = F.cross_entropy(model(input_ids=inp).logits.float().reshape(-1, V), tgt.reshape(-1), reduction="sum",
                          label_smoothing=0.1)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    got = causal_lm_loss(model, inp, tgt, label_smoothing=0.1, chunk_tokens=5)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # the head was restored: the model's own forward gives logits again
    assert model(input_ids=inp).logits.shape == (2, 11, V)


def test_hidden_and_head_weight_helpers():
    model = _llama(True)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(6))
    hidden = causal_lm_hidden(model, ids)
    assert hidden.shape == (2, 9, 32)
    w = lm_head_weight(model)
    assert w is model.model.embed_tokens.weight  # tied
    torch.testing.assert_close(hidden @ w.t(), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    logp = causal_lm_token_logprobs(model, ids[:, :-1], ids[:, 1:])
    ref = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1).gather(
        -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)


def test_apply_refuses_a_model_that_transforms_its_head_output():
    class Capped(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def get_output_embeddings(self):
            return self.lm.lm_head

        def forward(self, **kw):
            out = self.lm(**kw)
            out.logits = out.logits * 1.0
            return out

    with pytest.raises(RuntimeError, match="transforms or skips its head's output"):
        causal_lm_apply(Capped(_llama(True)), lambda h, w: (h @ w.t()).sum(), torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# inside DeepSpeed (ZeRO-3 partitions the head weight; the engine's hooks must gather it)

_ZERO_SCRIPT = r"""
import json, os, sys
import torch, torch.nn.functional as F
import deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from r1ray.config import DeepSpeedConfig, OptimConfig
from r1ray.train.core.deepspeed import build_engine, ds_config
from r1ray.train.core.losses import causal_lm_loss

stage, tie = int(sys.argv[1]), sys.argv[2] == "1"
deepspeed.init_distributed(dist_backend="gloo")
torch.set_num_threads(1)
ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))

def run(chunked):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))
    ds, optim = DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-2, warmup_steps=0)
    engine = build_engine(model, ds, optim, ds_config(ds, optim, micro_batch_size=4, grad_accum=1, world_size=1,
                                                      use_gpu=False, hidden_size=32))
    losses = []
    for _ in range(3):
        if chunked:
            loss = causal_lm_loss(engine, ids[:, :-1], ids[:, 1:], chunk_tokens=7) / ids[:, 1:].numel()
        else:
            logits = engine(input_ids=ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, 50), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses

print("RESULT", json.dumps({"plain": run(False), "chunked": run(True)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage, tie", [(3, True), (2, False)])
def test_chunked_loss_trains_like_plain_loss_in_deepspeed(stage, tie):
    """Three AdamW steps through a DeepSpeed engine: the losses after the first step agree only if the
    gradients (of the partitioned, possibly tied, head weight too) were the same."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _ZERO_SCRIPT, str(stage), "1" if tie else "0"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["plain"][0] > res["plain"][-1]  # it trains
    for a, b in zip(res["plain"], res["chunked"], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
