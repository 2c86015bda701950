"""Learner batch layouts for groups of completions that share a prompt (GRPO, best-of-n): one forward's input and
the index that takes its per-position outputs back to a ``[completions, completion tokens]`` grid.

Two layouts, the same numbers (up to float rounding; ``tests/unit/test_group_pack.py`` checks logprobs):

* ``padded``: one row per completion, ``prompt + completion[:-1]``, right-padded, a 2D attention mask. The prompt
  is run once per completion: with G = 8 and short answers most of the forward is the same prompt eight times.
* ``shared``: one row per *group*: the prompt once, then every completion as a branch that sees the prompt and
  itself only (a 4D block mask; the branch's positions continue from the prompt's)::

      row:       p0 p1 .. p(P-2) | p(P-1) c1_0 .. c1_(L1-2) | p(P-1) c2_0 .. | ...
      positions: 0  1  .. P-2    | P-1    P    ..           | P-1    P    .. | ...
      targets:   -  -  .. -      | c1_0   c1_1 .. c1_(L1-1) | c2_0   c2_1 .. | ...

  The prompt's last token starts each branch (its hidden state predicts the branch's first token, a different
  target per branch). Tokens per group: ``P - 1 + sum L_i`` instead of ``G (P - 1) + sum L_i`` plus padding to
  the longest; attention per group is quadratic in the row, so long completions favour ``padded``
  (``max_row`` chooses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE = -100


def shared_row_length(prompt: Sequence[int], completions: Sequence[Sequence[int]]) -> int:
    """Positions of the ``shared`` row of one group."""
    return len(prompt) - 1 + sum(max(1, len(c)) for c in completions)


def padded_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, Any]:
    """One row per (prompt, completion); see the module doc."""
    if not pairs:
        raise ValueError("padded_batch: no completions")
    width = max(len(p) + max(1, len(c)) for p, c in pairs) - 1
    cw = max(1, max(len(c) for _, c in pairs))
    n = len(pairs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    gather = torch.zeros((n, cw), dtype=torch.long)
    valid = torch.zeros((n, cw), dtype=torch.float32)
    for i, (p, c) in enumerate(pairs):
        if not p:
            raise ValueError(f"completion {i}: empty prompt")
        full = list(p) + list(c)
        m = max(len(full) - 1, len(p))  # an empty completion keeps the prompt's last token (no target)
        ids[i, :m] = torch.tensor(full[:m])
        attn[i, :m] = 1
        if c:
            targets[i, len(p) - 1:len(p) - 1 + len(c)] = torch.tensor(list(c))
            gather[i, :len(c)] = i * width + len(p) - 1 + torch.arange(len(c))
            valid[i, :len(c)] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "position_ids": None, "targets": targets,
            "gather": gather, "valid": valid, "n_tokens": int(attn.sum()), "layout": "padded"}


def shared_batch(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int) -> dict[str, Any]:
    """One row per (prompt, [completions]); completions are numbered group by group; see the module doc."""
    if not groups:
        raise ValueError("shared_batch: no groups")
    rows = len(groups)
    width = max(shared_row_length(p, cs) for p, cs in groups)
    n = sum(len(cs) for _, cs in groups)
    cw = max(1, max(len(c) for _, cs in groups for c in cs))
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    targets = torch.full((rows, width), IGNORE, dtype=torch.long)
    seg = torch.full((rows, width), -1, dtype=torch.long)  # -1 pad, 0 the prompt, k + 1 completion k
    gather = torch.zeros((n, cw), dtype=torch.long)
    valid = torch.zeros((n, cw), dtype=torch.float32)
    seq = 0
    for r, (p, cs) in enumerate(groups):
        if not p:
            raise ValueError(f"group {r}: empty prompt")
        s = len(p) - 1
        ids[r, :s] = torch.tensor(list(p[:-1]), dtype=torch.long)
        pos[r, :s] = torch.arange(s)
        seg[r, :s] = 0
        at = s
        for k, c in enumerate(cs):
            length = max(1, len(c))
            branch = [p[-1], *c[:-1]] if c else [p[-1]]
            ids[r, at:at + length] = torch.tensor(branch, dtype=torch.long)
            pos[r, at:at + length] = s + torch.arange(length)
            seg[r, at:at + length] = k + 1
            if c:
                targets[r, at:at + len(c)] = torch.tensor(list(c), dtype=torch.long)
                gather[seq, :len(c)] = r * width + at + torch.arange(len(c))
                valid[seq, :len(c)] = 1.0
            at += length
            seq += 1
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)  # [rows, T, 1], [rows, 1, T]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    # padding attends to itself only (a query row with no key gives NaN in softmax, and NaN * 0 is NaN)
    allowed |= torch.eye(width, dtype=torch.bool) & (q < 0)
    return {"input_ids": ids, "attention_mask": allowed.unsqueeze(1), "position_ids": pos, "targets": targets,
            "gather": gather, "valid": valid, "n_tokens": int((seg >= 0).sum()), "layout": "shared"}


def attention_mask_for(model: Any, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D boolean block mask as the model's attention takes it: SDPA a boolean (True attends), eager an
    additive float mask; 2D masks go through unchanged (the model builds its causal mask from them)."""
    if mask.dim() != 4:
        return mask
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"grpo.share_prompt needs sdpa or eager attention, the model uses {impl!r} "
                     "(set grpo.share_prompt=false)")
