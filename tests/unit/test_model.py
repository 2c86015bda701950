"""Presets build, and the HF directory round trip gives identical logits through from_pretrained."""

from __future__ import annotations

import pytest
import torch

from r1ray.config import ConfigError, load_config
from r1ray.model import ModelConfig, build_model, count_parameters, load_model, save_model
from r1ray.model.tokenizer import END_THINK, THINK, load_tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_load_same_logits(family, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(family=family), tok, seed=0).eval()
    assert model.get_input_embeddings().num_embeddings == len(tok)
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert not list((tmp_path / "m").glob("*.bin"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, len(tok), (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_seeded_build_is_deterministic(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    a = build_model(ModelConfig(), tok, seed=3)
    b = build_model(ModelConfig(), tok, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_init_from_directory(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    m = build_model(ModelConfig(preset="tiny"), tok, seed=1)
    save_model(m, tok, tmp_path / "base")
    m2 = build_model(ModelConfig(init_from=str(tmp_path / "base")), tok)
    assert count_parameters(m2) == count_parameters(m)
    assert load_model(tmp_path / "base").config.hidden_size == 192


def test_unknown_preset_lists_valid():
    from r1ray.config import R1Config

    class C(R1Config):
        model: ModelConfig = ModelConfig()
        """Model."""

    with pytest.raises(ConfigError, match="preset 'huge' is unknown"):
        load_config(C, ["model.preset=huge"])


def test_reasoning_tokens_are_single_and_survive_decode(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = tok(f"{THINK}the{END_THINK}")["input_ids"]
    assert tok.convert_tokens_to_ids(THINK) in ids and tok.convert_tokens_to_ids(END_THINK) in ids
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == f"{THINK}the{END_THINK}"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_render_chat_equals_the_tokenizers_chat_template(tiny_tokenizer_dir):
    """The data stage writes chat-form reasoning documents before any tokenizer exists (``render_chat``): they
    must be exactly what the chat template renders, or pretraining would teach a format SFT and GRPO never use."""
    from r1ray.model.tokenizer import load_tokenizer, render_chat
    from r1ray.tasks.arithmetic import generate

    tok = load_tokenizer(tiny_tokenizer_dir)
    convs = [
        [{"role": "user", "content": "2+2?"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "<answer>4</answer>", "reasoning_content": "2+2=4"}],
    ]
    for msgs in convs:
        for gen in (False, True):
            assert render_chat(msgs, gen) == tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    doc = generate(0, 4, chat_fraction=1.0)
    from r1ray.tasks.arithmetic import ArithmeticTask

    p = ArithmeticTask().problem(4 // 3, seed=0, split="train", difficulty=2)
    prompt = tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
    assert doc.chat and doc.text == prompt + p.completion + "<|im_end|>\n"
    frac = sum(generate(0, i, chat_fraction=0.5).chat for i in range(2000)) / 2000
    assert 0.45 < frac < 0.55 and not generate(0, 4).chat


def test_init_from_is_loaded_in_the_training_precision(tiny_tokenizer_dir, tmp_path):
    """transformers 5 keeps a bf16 export's dtype on load; an fp32 run must still train in fp32 (and a bf16
    run in bf16), whatever the export was saved in."""
    import torch

    from r1ray.model import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    bf16_export = tmp_path / "bf16"
    save_model(build_model(ModelConfig(preset="debug"), tok, seed=0).to(torch.bfloat16), tok, bf16_export)
    cfg = ModelConfig(init_from=str(bf16_export))
    assert {p.dtype for p in build_model(cfg, tok, precision="fp32").parameters()} == {torch.float32}
    assert {p.dtype for p in build_model(cfg, tok, precision="bf16").parameters()} == {torch.bfloat16}
    import pytest

    with pytest.raises(ValueError, match="precision must be one of"):
        build_model(cfg, tok, precision="fp8")


def test_trained_tokenizer_splits_every_integer_into_digits(tiny_tokenizer_dir, tmp_path):
    """The default (split_digits): no token holds two digits, every integer round-trips, the reasoning tags stay
    single non-special tokens; with split_digits off BPE learns multi-digit tokens from the same texts."""
    import random

    from r1ray.model.tokenizer import REASONING_TOKENS, train_tokenizer

    texts = [f"{THINK}\nones {i % 10} + {i % 7} = {i % 10 + i % 7}\n{END_THINK}\n<answer>{i * 37}</answer> {i} items"
             for i in range(3000)]
    tok = load_tokenizer(tiny_tokenizer_dir)  # the shared fixture is trained with the default too
    split = train_tokenizer(texts, tmp_path / "digits", vocab_size=500)
    merged = train_tokenizer(texts, tmp_path / "merged", vocab_size=500, split_digits=False)
    r = random.Random(0)
    numbers = list(range(0, 1000)) + [r.randint(0, 10**12) for _ in range(2000)]
    for t in (tok, split):
        for n in numbers:
            for text in (str(n), f"has {n} apples", f"={n},"):
                ids = t(text, add_special_tokens=False)["input_ids"]
                digit_tokens = [t.decode([i]).strip() for i in ids if any(c.isdigit() for c in t.decode([i]))]
                assert digit_tokens == list(str(n)), (text, t.convert_ids_to_tokens(ids))
                assert t.decode(ids) == text
        for tag in REASONING_TOKENS:
            assert len(t(f"x{tag}y", add_special_tokens=False)["input_ids"]) == 3
            assert tag not in t.all_special_tokens
    multi = [w for w in merged.get_vocab() if sum(c.isdigit() for c in w) >= 2]
    assert multi and not [w for w in split.get_vocab() if sum(c.isdigit() for c in w) >= 2]
