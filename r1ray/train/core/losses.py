"""Token losses computed chunk by chunk from a causal LM's final hidden states, so the fp32 logits of a
whole batch never exist: cross-entropy (label smoothing, ignore_index), per-token log-probabilities of given
targets (GRPO, distillation) and per-token entropy, all differentiable.

Why: ``F.cross_entropy(logits.float(), ...)`` on a [batch x seq, vocab] tensor holds the bf16 logits, their
fp32 copy, the log-softmax and its gradient at once: ~4 GB per micro-batch for 16 x 2048 tokens at vocab 32k.
Here each chunk of ``chunk_tokens`` rows computes its logits (``hidden @ W.T`` in the input dtype, then fp32),
reduces them to one number per token and frees them; the backward pass recomputes each chunk's logits (one
extra head matmul, ~3% of a 350m model's step) and accumulates the weight gradient in fp32. Peak extra memory
is a few [chunk_tokens, vocab] fp32 buffers, whatever the batch.

Why not a library: Liger-Kernel's fused linear cross-entropy and Apple's cut-cross-entropy do the same in
Triton, on CUDA only; r1ray trains on CPUs too and needs one implementation whose CPU parity test covers the
GPU path. Either can replace ``_LinearCrossEntropy`` on GPUs behind the same functions if a profile asks.

With a transformers model (works on a DeepSpeed engine at every ZeRO stage; see ``causal_lm_apply``)::

    loss_sum = causal_lm_loss(engine, ids[:, :-1], ids[:, 1:], label_smoothing=0.1)   # sum over tokens
    logp = causal_lm_token_logprobs(engine, ids[:, :-1], ids[:, 1:], temperature=0.7)  # [B, T-1]

``torch.compile``: compile the decoder (or its layers), not these functions: they patch the head's forward
per call, and their chunk matmuls are large enough to need no compiler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Logits per chunk when ``chunk_tokens`` is None: 32M (a 128 MiB fp32 buffer), i.e. 1024 tokens at vocab
32k, 220 at vocab 152k. Large enough for full-speed matmuls, small next to activations."""


def chunk_rows(vocab_size: int, chunk_tokens: int | None) -> int:
    """Tokens per chunk: ``chunk_tokens``, or ``DEFAULT_CHUNK_ELEMENTS // vocab_size`` when None."""
    if chunk_tokens is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (or None for the default), got {chunk_tokens}")
    return int(chunk_tokens)


def _logits(h: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    z = (h @ weight.t()).float()  # the matmul in the input dtype (bf16 tensor cores), as the model's head would
    if scale != 1.0:
        z = z * scale
    return z


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of ``softmax(scale * hidden @ weight.T)`` against ``targets``, chunked.

    forward: loss[i] = lse_i - (1 - eps) z_i[t_i] - eps * mean_j z_ij  (0 where t_i == ignore_index),
    the definition of ``F.cross_entropy``'s label smoothing; saves hidden, weight, targets and lse (fp32 [N]).
    backward: dL/dz_ij = g_i (softmax_ij - (1 - eps) [j == t_i] - eps / V), recomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, smoothing, ignore_index, scale):  # noqa: D102
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = _logits(hidden[s:e], weight, scale)
            lse_c = torch.logsumexp(z, dim=-1)
            t = targets[s:e]
            valid = t != ignore_index
            zt = z.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
            if smoothing:
                li = lse_c - (1.0 - smoothing) * zt - smoothing * z.mean(dim=-1)
            else:
                li = lse_c - zt
            loss[s:e] = torch.where(valid, li, 0.0)
            lse[s:e] = lse_c
            del z
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.smoothing, ctx.ignore_index, ctx.scale = chunk, smoothing, ignore_index, scale
        ctx.mark_non_differentiable(lse)
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, eps, ignore, scale = ctx.chunk, ctx.smoothing, ctx.ignore_index, ctx.scale
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h = hidden[s:e]
            p = _logits(h, weight, scale).sub_(lse[s:e, None]).exp_()  # softmax, in place of the logits
            t = targets[s:e]
            valid = t != ignore
            if eps:
                p.sub_(eps / vocab)
            p.scatter_add_(1, torch.where(valid, t, 0).unsqueeze(1),
                           torch.full((e - s, 1), -(1.0 - eps), dtype=p.dtype, device=p.device))
            row = torch.where(valid, grad[s:e].float(), 0.0)
            if scale != 1.0:
                row = row * scale
            p.mul_(row.unsqueeze(1))
            dz = p.to(hidden.dtype)
            del p
            if need_h:
                gh[s:e] = dz @ weight
            if need_w:
                gw += (dz.t() @ h).float()
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None, None, None


class _LinearEntropy(torch.autograd.Function):
    """Per-token entropy H_i = lse_i - sum_j p_ij z_ij of ``softmax(scale * hidden @ weight.T)``, chunked;
    dH/dz_ij = -p_ij (z_ij - E_i[z]) = -p_ij (logp_ij + H_i)."""

    @staticmethod
    def forward(ctx, hidden, weight, chunk, scale):  # noqa: D102
        n = hidden.shape[0]
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = _logits(hidden[s:e], weight, scale)
            lse_c = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - lse_c[:, None])
            ent[s:e] = lse_c - (p * z).sum(dim=-1)
            lse[s:e] = lse_c
            del z, p
        ctx.save_for_backward(hidden, weight, lse)
        ctx.chunk, ctx.scale = chunk, scale
        return ent

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        hidden, weight, lse = ctx.saved_tensors
        chunk, scale = ctx.chunk, ctx.scale
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h = hidden[s:e]
            # z - E_p[z] == logp - E_p[logp]: the log-probabilities are small numbers where p is not, so fp32
            # keeps more digits than with the raw logits
            logp = _logits(h, weight, scale).sub_(lse[s:e, None])
            p = torch.exp(logp)
            neg_ent = (p * logp).sum(dim=-1, keepdim=True)
            dz = logp.sub_(neg_ent).mul_(p).mul_((-grad[s:e].float() * scale).unsqueeze(1)).to(hidden.dtype)
            del logp, p
            if need_h:
                gh[s:e] = dz @ weight
            if need_w:
                gw += (dz.t() @ h).float()
        return gh, (gw.to(weight.dtype) if need_w else None), None, None


def _flatten(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None):
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != the head weight's {tuple(weight.shape)}[1]: pass "
                         "lm_head.weight ([vocab, hidden])")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden states are {hidden.dtype} but the head weight is {weight.dtype}: pass both in the "
                         "model's dtype (the logits are upcast to fp32 chunk by chunk)")
    if targets is not None and tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected the hidden states' leading shape "
                         f"{tuple(hidden.shape[:-1])} (one target per position)")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1) if targets is not None else None
    return h, t


def _scale(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / temperature


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> torch.Tensor:
    """``F.cross_entropy((hidden @ lm_head_weight.T).float(), targets, ...)`` without the batch's logits.

    hidden: [..., H] final hidden states (after the final norm); lm_head_weight: [V, H]; targets: [...] ids
    (``ignore_index`` positions count neither in the loss nor in the ``mean``). reduction: ``sum`` (what the
    training loop wants: it divides by the step's token count), ``mean`` or ``none`` (fp32, targets' shape)."""
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction {reduction!r}: expected sum, mean or none")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    h, t = _flatten(hidden, lm_head_weight, targets)
    chunk = chunk_rows(lm_head_weight.shape[0], chunk_tokens)
    per_token = _LinearCrossEntropy.apply(h, lm_head_weight, t, chunk, float(label_smoothing), int(ignore_index), 1.0)
    if reduction == "none":
        return per_token.reshape(targets.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / (t != ignore_index).sum()  # as F.cross_entropy: nan when every target is ignored


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """log softmax(hidden @ W.T / temperature)[targets], per token (fp32, targets' shape), differentiable;
    0 where ``targets == ignore_index``. GRPO's policy ratio and distillation's student term use it."""
    h, t = _flatten(hidden, lm_head_weight, targets)
    chunk = chunk_rows(lm_head_weight.shape[0], chunk_tokens)
    nll = _LinearCrossEntropy.apply(h, lm_head_weight, t, chunk, 0.0, int(ignore_index), _scale(temperature))
    return (-nll).reshape(targets.shape)


def entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    chunk_tokens: int | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution softmax(hidden @ W.T / temperature), per position
    (fp32, hidden's leading shape), differentiable (an entropy bonus or a logged statistic)."""
    h, _ = _flatten(hidden, lm_head_weight, None)
    chunk = chunk_rows(lm_head_weight.shape[0], chunk_tokens)
    return _LinearEntropy.apply(h, lm_head_weight, chunk, _scale(temperature)).reshape(hidden.shape[:-1])


# --------------------------------------------------------------------------------------------------
# transformers causal LMs
# --------------------------------------------------------------------------------------------------


def unwrap(model: Any) -> Any:
    """The transformers model inside a DeepSpeed engine (``.module``), or ``model`` itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def lm_head_weight(model: Any) -> torch.Tensor:
    """The output projection's weight [V, H] (the input embedding itself when embeddings are tied)."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (not a causal LM head model)")
    return head.weight


def causal_lm_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the final norm) of a transformers causal LM such as
    ``LlamaForCausalLM``: ``model.model(...).last_hidden_state``; no logits are computed.

    For a plain model or ZeRO <= 2. Under ZeRO-3 the head's weight is a partition outside the head's own
    forward, and a call that bypasses the engine skips DeepSpeed's backward hooks: use ``causal_lm_apply``."""
    m = unwrap(model)
    body = m.get_decoder() if hasattr(m, "get_decoder") else m.model
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def causal_lm_apply(model: Any, head_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``model`` (a transformers causal LM or a DeepSpeed engine around one) with its output head replaced,
    for this call, by ``head_fn(hidden [B, T, H], lm_head_weight [V, H])``; returns what ``head_fn`` returned.

    The call goes through ``model(...)`` and the head module's own ``__call__``, so DeepSpeed's engine hooks
    run and, under ZeRO-3, the head's weight (tied or not) is gathered for ``head_fn`` and again for its
    backward, exactly as for the stock head."""
    m = unwrap(model)
    head = m.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(m).__name__} has no output embeddings (not a causal LM head model)")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(m).__name__}'s output head has a bias; the chunked losses support bias-free heads")
    if getattr(getattr(m, "config", None), "final_logit_softcapping", None):
        raise ValueError(f"{type(m).__name__} soft-caps its logits after the head; the chunked losses do not")
    produced: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        produced.append(head_fn(hidden, head.weight))
        return produced[-1]

    head.forward = forward  # an instance attribute shadows the class's forward; nn.Module.__call__ (hooks) stays
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=0)
    finally:
        del head.forward
    # DeepSpeed's hooks may hand back a view of the head's output (same storage) to hook its backward
    if len(produced) != 1 or not _same_tensor(out.logits, produced[0]):
        raise RuntimeError(f"{type(m).__name__}.forward transforms or skips its head's output; use "
                           "causal_lm_hidden and lm_head_weight with a plain model instead")
    return out.logits


def _same_tensor(a: Any, b: torch.Tensor) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


def causal_lm_loss(model: Any, input_ids: torch.Tensor, targets: torch.Tensor, *,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   chunk_tokens: int | None = None, label_smoothing: float = 0.0, ignore_index: int = -100,
                   reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of ``model`` on (input_ids -> targets), chunked (see ``chunked_cross_entropy``);
    ``targets`` has input_ids' shape (next-token training: ``ids[:, :-1]`` -> ``ids[:, 1:]``)."""
    return causal_lm_apply(
        model, lambda h, w: chunked_cross_entropy(h, w, targets, chunk_tokens=chunk_tokens,
                                                  label_smoothing=label_smoothing, ignore_index=ignore_index,
                                                  reduction=reduction),
        input_ids, attention_mask, position_ids)


def causal_lm_token_logprobs(model: Any, input_ids: torch.Tensor, targets: torch.Tensor, *,
                             attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                             chunk_tokens: int | None = None, temperature: float = 1.0,
                             ignore_index: int = -100) -> torch.Tensor:
    """Per-token log-probabilities [B, T] of ``targets`` under ``model``, chunked (see ``token_logprobs``)."""
    return causal_lm_apply(
        model, lambda h, w: token_logprobs(h, w, targets, chunk_tokens, temperature=temperature,
                                           ignore_index=ignore_index),
        input_ids, attention_mask, position_ids)
