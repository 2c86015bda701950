"""Distillation's divergences against hand-computed values, and the checks made before any worker starts."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")


def test_divergences_match_the_definitions():
    from r1ray.train.stages.distill import divergence

    s = torch.tensor([[0.0, math.log(3.0)]])  # student p = (1/4, 3/4)
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher q = (3/4, 1/4)
    p, q = torch.tensor([0.25, 0.75]), torch.tensor([0.75, 0.25])
    fwd = float((q * (q / p).log()).sum())
    rev = float((p * (p / q).log()).sum())
    m = 0.5 * q + 0.5 * p
    jsd = 0.5 * float((q * (q / m).log()).sum()) + 0.5 * float((p * (p / m).log()).sum())
    assert float(divergence(s, t, "forward_kl")) == pytest.approx(fwd, rel=1e-6)
    assert float(divergence(s, t, "reverse_kl")) == pytest.approx(rev, rel=1e-6)
    assert float(divergence(s, t, "jsd", beta=0.5)) == pytest.approx(jsd, rel=1e-6)
    # equal distributions: zero; temperature flattens both towards uniform, shrinking the divergence
    assert float(divergence(t, t, "forward_kl")) == pytest.approx(0.0, abs=1e-7)
    assert float(divergence(s, t, "forward_kl", temperature=4.0)) < fwd
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(s, t, "l2")


def test_a_student_with_another_tokenizer_is_refused_before_training(tiny_tokenizer_dir, tmp_path):
    from r1ray.model import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer, train_tokenizer
    from r1ray.train.stages.distill import DistillConfig, DistillStage

    teacher = tmp_path / "teacher"
    tok = load_tokenizer(tiny_tokenizer_dir)
    save_model(build_model(ModelConfig(preset="debug"), tok, seed=1), tok, teacher)
    other_tok = train_tokenizer([f"other words {i} and more {i * 7}" for i in range(300)], tmp_path / "tok2",
                                vocab_size=350)
    student = tmp_path / "student"
    save_model(build_model(ModelConfig(preset="debug-student"), other_tok, seed=1), other_tok, student)
    cfg = DistillConfig.model_validate({"distill": {"teacher": str(teacher)}, "model": {"init_from": str(student)},
                                        "storage": {"root": str(tmp_path)}})
    with pytest.raises(ValueError, match="use different tokenizers"):
        DistillStage.plan(cfg)
    with pytest.raises(ValueError, match="distill.teacher is unset"):
        DistillStage.plan(DistillConfig.model_validate({"storage": {"root": str(tmp_path)}}))


def test_student_presets_are_a_quarter_of_their_teachers():
    from r1ray.model.build import ModelConfig, hf_config

    def params(preset: str, vocab: int = 8192) -> int:
        from transformers import AutoModelForCausalLM

        c = hf_config(ModelConfig(preset=preset), vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters())

    for teacher in ("debug", "tiny", "125m"):
        assert params(f"{teacher}-student") <= 0.25 * params(teacher), teacher
    assert params("mini-student", 2052) <= 0.25 * params("mini", 2052)  # the default pair, its default vocabulary


def _llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(c).eval()
    with torch.no_grad():  # norms away from their all-ones start, so each layer's can be told apart
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def test_shrink_keeps_the_model_at_its_own_shape_and_cuts_along_every_axis(tmp_path):
    from transformers import AutoModelForCausalLM

    from r1ray.model.shrink import ShrinkShape, shrink_model

    model = _llama()
    calib = [[(i * 7 + j) % 64 for j in range(20)] for i in range(6)]
    ids = torch.tensor([calib[0]])
    same = shrink_model(model, ShrinkShape(32, 4, 2, 48), calib)
    with torch.no_grad():
        assert torch.equal(same(input_ids=ids).logits, model(input_ids=ids).logits)
    # the second layer made an identity (its attention and MLP write nothing): the layer that goes
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    small = shrink_model(model, ShrinkShape(16, 3, 1, 24), calib)
    c = small.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.num_attention_heads, c.intermediate_size,
            c.head_dim) == (16, 3, 1, 2, 24, 8)
    # every student weight is a slice of the teacher's: embedding columns, and the layers other than layer 1
    emb_t, emb_s = model.model.embed_tokens.weight, small.model.embed_tokens.weight
    cols = [next(j for j in range(32) if torch.equal(emb_t[:, j], emb_s[:, k])) for k in range(16)]
    assert cols == sorted(cols) and len(set(cols)) == 16
    for j, src in enumerate([0, 2, 3]):
        assert torch.equal(small.model.layers[j].input_layernorm.weight,
                           model.model.layers[src].input_layernorm.weight[cols])
        down_t = model.model.layers[src].mlp.down_proj.weight[cols]
        assert all(any(torch.equal(down_t[:, i], col) for i in range(48))
                   for col in small.model.layers[j].mlp.down_proj.weight.T)
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()  # still tied
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, small(input_ids=ids).logits)
    with pytest.raises(ValueError, match="num_hidden_layers 5 is not in 1..4"):
        shrink_model(model, ShrinkShape(16, 5, 1, 24), calib)
