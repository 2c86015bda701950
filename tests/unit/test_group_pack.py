"""The learner's two batch layouts for groups sharing a prompt give each completion's logprobs (and their
gradients) as that completion run alone would."""

from __future__ import annotations

import pytest
import torch

from r1ray.train.core.losses import causal_lm_apply, token_logprobs
from r1ray.train.stages.grpo.pack import attention_mask_for, padded_batch, shared_batch, shared_row_length

PAD = 0


def _model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).float()


GROUPS = [
    ([5, 6, 7, 8, 9], [[10, 11, 12], [13], [14, 15, 16, 17, 18, 19], []]),
    ([20, 21], [[22, 23], [24, 25, 26, 27], [28], [29, 30]]),
    ([31], [[32, 33, 34], [35], [36, 37], [38]]),
]


def _alone(model, prompt, completion):
    """logprob of each completion token, the sequence run alone (no padding, no mask)."""
    ids = torch.tensor([prompt + completion[:-1]])
    targets = torch.full_like(ids, -100)
    targets[0, len(prompt) - 1:] = torch.tensor(completion)
    lp = causal_lm_apply(model, lambda h, w: token_logprobs(h, w, targets), ids)
    return lp[0, len(prompt) - 1:]


def _layout(model, batch):
    attn = attention_mask_for(model, batch["attention_mask"], torch.float32)
    lp = causal_lm_apply(model, lambda h, w: token_logprobs(h, w, batch["targets"]), batch["input_ids"], attn,
                         batch["position_ids"])
    return lp.reshape(-1)[batch["gather"]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_both_layouts_equal_each_completion_alone(attn):
    model = _model(attn)
    shared = shared_batch(GROUPS, PAD)
    padded = padded_batch([(p, c) for p, cs in GROUPS for c in cs], PAD)
    assert shared["input_ids"].shape[0] == len(GROUPS)
    assert shared["input_ids"].shape[1] == max(shared_row_length(p, cs) for p, cs in GROUPS)
    assert shared["n_tokens"] < padded["n_tokens"]  # the prompts once per group
    assert torch.equal(shared["valid"], padded["valid"])
    got = {name: _layout(model, b) for name, b in (("shared", shared), ("padded", padded))}
    i = 0
    for p, cs in GROUPS:
        for c in cs:
            if c:
                want = _alone(model, p, c)
                for name, lp in got.items():
                    torch.testing.assert_close(lp[i, :len(c)], want, rtol=1e-5, atol=1e-5, msg=name)
            i += 1
    for lp in got.values():
        assert torch.isfinite(lp).all()


def test_shared_layout_gradients_equal_padded():
    model = _model("sdpa")
    grads = []
    for batch in (shared_batch(GROUPS, PAD), padded_batch([(p, c) for p, cs in GROUPS for c in cs], PAD)):
        model.zero_grad()
        lp = _layout(model, batch)
        (lp * batch["valid"]).sum().backward()
        grads.append([q.grad.clone() for q in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_mask_blocks_other_branches_and_padding():
    b = shared_batch([([1, 2, 3], [[4, 5], [6]]), ([7], [[8]])], PAD)
    m = b["attention_mask"][0, 0]
    # row 0: p0 p1 | p2 4 | p2   (positions 0 1 | 2 3 | 2)
    assert b["input_ids"][0].tolist() == [1, 2, 3, 4, 3]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 2]
    assert m[4].tolist() == [True, True, False, False, True]  # branch 2 sees the prompt and itself only
    assert m[3].tolist() == [True, True, True, True, False]
    pad_row = b["attention_mask"][1, 0]
    assert b["input_ids"][1].tolist()[:1] == [7] and pad_row[3].tolist() == [False, False, False, True, False]
    assert b["gather"].tolist()[0][:2] == [2, 3] and b["targets"][0, 2:4].tolist() == [4, 5]
