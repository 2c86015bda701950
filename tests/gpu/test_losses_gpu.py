"""The chunked loss on CUDA: bf16 parity with the plain fp32-upcast loss, and the memory it saves, measured
with the CUDA allocator's peak (the CPU tests prove the shapes; this proves the bytes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


def _inputs(n=8192, h=1024, v=32000, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::7] = -100
    return hidden, weight, targets


def test_bf16_parity_on_cuda():
    from r1ray.train.core.losses import chunked_cross_entropy

    hidden, weight, targets = _inputs(n=2048)
    ref = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum", label_smoothing=0.1)
    ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_cross_entropy(hidden, weight, targets, label_smoothing=0.1)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=2e-2, atol=2e-2 * float(ref_gh.abs().max()))
    torch.testing.assert_close(gw.float(), ref_gw.float(), rtol=2e-2, atol=2e-2 * float(ref_gw.abs().max()))


def _peak_extra(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_peak_memory_is_a_fraction_of_the_plain_loss():
    from r1ray.train.core.losses import chunked_cross_entropy

    hidden, weight, targets = _inputs()

    def plain():
        F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum").backward()

    def chunked():
        chunked_cross_entropy(hidden, weight, targets).backward()

    plain_bytes = _peak_extra(plain)
    hidden.grad = weight.grad = None
    chunked_bytes = _peak_extra(chunked)
    print(f"peak extra memory: plain {plain_bytes / 2**30:.2f} GiB, chunked {chunked_bytes / 2**30:.2f} GiB")
    # plain holds [8192, 32000] logits in bf16 + fp32 + their gradients (~2.5 GiB); chunked: gradients of
    # hidden and weight (+ the fp32 weight-gradient accumulator) and one 1024-token chunk
    assert chunked_bytes < 0.35 * plain_bytes
