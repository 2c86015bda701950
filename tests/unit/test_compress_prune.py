"""Structured pruning: the configured share of heads/channels goes, the pruned export loads with
``from_pretrained``, and removing units that contribute nothing leaves the model's outputs unchanged (which
proves every Q/K/V/O and MLP slice, GQA grouping included, lines up)."""

from __future__ import annotations

import pytest
import torch

from r1ray.compress.config import PruneConfig
from r1ray.compress.prune import plan_counts, prune_dir, prune_model


def _model(tokenizer_dir, family: str):
    from r1ray.model.build import ModelConfig, build_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    # debug preset: 4 query heads, 2 KV heads (GQA groups of 2), 172 MLP channels, 2 layers
    return build_model(ModelConfig(preset="debug", family=family), tok, seed=0).eval(), tok


def _silence(model, dead_heads: list[list[int]], dead_channels: list[list[int]]):
    """Zero the o_proj columns of ``dead_heads`` and the down_proj columns of ``dead_channels`` per layer, so
    those units contribute exactly nothing."""
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer, heads, chans in zip(model.model.layers, dead_heads, dead_channels, strict=True):
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            layer.mlp.down_proj.weight[:, chans] = 0


@pytest.mark.parametrize(("family", "unit", "score"), [("llama", "query", "magnitude"),
                                                       ("qwen2", "kv_group", "activation")])
def test_pruning_silent_units_keeps_outputs_and_loads(tiny_tokenizer_dir, tmp_path, family, unit, score):
    from transformers import AutoModelForCausalLM

    model, tok = _model(tiny_tokenizer_dir, family)
    g = torch.Generator().manual_seed(1)
    chans = [sorted(torch.randperm(172, generator=g)[:43].tolist()) for _ in range(2)]  # 25% of each layer
    # query: one head of each KV group (groups {0,1}, {2,3}); kv_group: a whole group
    heads = [[1, 2], [0, 3]] if unit == "query" else [[2, 3], [0, 1]]
    _silence(model, heads, chans)
    cfg = PruneConfig(enabled=True, heads_fraction=0.5, head_unit=unit, mlp_fraction=0.25, score=score)
    texts = ["the a of to and in is it that for on with", "1 + 4 = 5. she they we you at by"]
    pruned, plan = prune_model(model, cfg, tok, texts)

    assert plan.heads_after == 2 and plan.intermediate_after == 129
    assert plan.kv_heads_after == (2 if unit == "query" else 1)
    assert plan.summary()["heads_removed_share"] == 0.5 and plan.summary()["mlp_removed_share"] == 0.25
    assert plan.kept_heads == [[h for h in range(4) if h not in dead] for dead in heads]
    assert plan.kept_channels == [[c for c in range(172) if c not in dead] for dead in chans]

    ids = torch.tensor([tok("the a of to and in 12 + 15 = 27.")["input_ids"]])
    with torch.no_grad():
        want, got = model(ids).logits, pruned(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # the saved directory is a plain HF model
    from r1ray.model.build import save_model

    save_model(pruned, tok, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", use_safetensors=True).eval()
    assert (loaded.config.num_attention_heads, loaded.config.intermediate_size) == (2, 129)
    assert loaded.model.layers[0].self_attn.q_proj.weight.shape == (2 * 16, 64)
    assert loaded.model.layers[0].self_attn.k_proj.weight.shape == (plan.kv_heads_after * 16, 64)
    if family == "qwen2":
        assert loaded.model.layers[0].self_attn.k_proj.bias.shape == (plan.kv_heads_after * 16,)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_prune_dir_removes_share_and_multiple_of(tiny_tokenizer_dir, tmp_path):
    from r1ray.model.build import save_model

    model, tok = _model(tiny_tokenizer_dir, "llama")
    save_model(model, tok, tmp_path / "base")
    cfg = PruneConfig(enabled=True, mlp_fraction=0.5, mlp_multiple_of=32, score="magnitude")
    plan = prune_dir(tmp_path / "base", tmp_path / "out", cfg)
    assert plan.heads_after == 4 and plan.intermediate_after == 96  # 172 * 0.5 = 86 -> nearest multiple of 32
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "out").intermediate_size == 96


def test_plan_counts_refuses_removing_everything():
    with pytest.raises(ValueError, match="heads_fraction"):
        plan_counts(4, 2, 172, PruneConfig(enabled=True, heads_fraction=0.9, head_unit="query"))
    with pytest.raises(ValueError, match="KV groups"):
        plan_counts(4, 2, 172, PruneConfig(enabled=True, heads_fraction=0.8, head_unit="kv_group"))
    # multi-head attention: a query head goes with its KV head whatever the unit
    assert plan_counts(4, 4, 100, PruneConfig(enabled=True, heads_fraction=0.25)) == (3, 3, 100)
