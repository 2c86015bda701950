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
