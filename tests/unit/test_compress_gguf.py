"""GGUF export: the file holds what llama.cpp needs (read back with the gguf package), and real llama.cpp
(llama-cpp-python) loads it, tokenizes like the Hugging Face tokenizer and decodes the HF model's greedy tokens,
for a plain and for a pruned model (whose head_dim is no longer hidden / heads)."""

from __future__ import annotations

import pytest

from r1ray.compress.gguf import export_gguf, llama_cpp_available, verify_gguf
from tests.unit.test_compress_fixtures import cycle_text, trained_dir

HAVE_LLAMA, WHY = llama_cpp_available()
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason=f"llama.cpp check skipped: {WHY}")
PROMPTS = [cycle_text(0, 5), cycle_text(7, 3), "the", cycle_text(11, 8) + " 12 + 15 = 27.", "<think>"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir):
    return trained_dir(tmp_path_factory, tiny_tokenizer_dir)


def test_gguf_metadata_and_tensors(trained, tmp_path):
    import gguf

    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(trained)
    for qtype, want in (("f16", "F16"), ("q8_0", "Q8_0")):
        path = export_gguf(trained, tmp_path / f"m-{qtype}.gguf", qtype)
        r = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
        assert fields["general.architecture"] == "llama"
        assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
        assert fields["llama.attention.key_length"] == 16
        # the default tokenizer splits digits with Qwen2's regex: llama.cpp's "qwen2" pre-tokenizer
        assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
        assert len(fields["tokenizer.ggml.tokens"]) == len(tok)
        assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
        assert fields["tokenizer.ggml.add_bos_token"] is False
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert "output.weight" not in types  # tied head: llama.cpp reuses token_embd
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == want and types["token_embd.weight"] == want
        # 172 MLP channels are not whole Q8_0 blocks of 32: ffn_down falls back to F16 as in convert_hf_to_gguf
        assert types["blk.0.ffn_down.weight"] == "F16"
    with pytest.raises(ValueError, match="f16"):
        export_gguf(trained, tmp_path / "x.gguf", "q4_0")


def test_quantized_export_is_refused(trained, tmp_path):
    from r1ray.compress.quantize import quantize_dir

    q = quantize_dir(trained, tmp_path / "int8")
    with pytest.raises(ValueError, match="unquantized"):
        export_gguf(q, tmp_path / "x.gguf")


@needs_llama
def test_llama_cpp_matches_hf_greedy(trained, tmp_path):
    # measured: F16 8e-4, Q8_0 1.4e-2; Q/K left in HF's rotate-half layout (no permutation) gives 0.29
    for qtype, least, err in (("f16", 1.0, 0.01), ("q8_0", 0.8, 0.05)):
        path = export_gguf(trained, tmp_path / f"m-{qtype}.gguf", qtype)
        check = verify_gguf(path, trained, PROMPTS, max_tokens=12, qtype=qtype)
        assert check.tokenizer_match == 1.0, check.mismatches
        assert check.greedy_match >= least, check.mismatches
        assert check.logits_rel_err < err
        assert check.decode_tokens_per_s > 0


@needs_llama
def test_llama_cpp_runs_a_pruned_model(trained, tmp_path):
    from r1ray.compress.config import PruneConfig
    from r1ray.compress.prune import prune_dir

    cfg = PruneConfig(enabled=True, heads_fraction=0.5, head_unit="kv_group", mlp_fraction=0.25,
                      mlp_multiple_of=32, score="magnitude")
    prune_dir(trained, tmp_path / "pruned", cfg)
    path = export_gguf(tmp_path / "pruned", tmp_path / "pruned.gguf", "f16")
    check = verify_gguf(path, tmp_path / "pruned", PROMPTS, max_tokens=12, qtype="f16")
    assert check.tokenizer_match == 1.0 and check.greedy_match == 1.0, check.mismatches
    assert check.logits_rel_err < 0.01
