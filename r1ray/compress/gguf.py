"""GGUF export for llama.cpp (F16 and Q8_0), written with the ``gguf`` package, and its check in real llama.cpp.

The layout follows llama.cpp's own ``convert_hf_to_gguf.py`` (``LlamaModel``/``Qwen2Model`` and
``TextModel._set_vocab_gpt2``) for what r1ray trains: a Llama or Qwen2 model with a byte-level BPE tokenizer.

- hyperparameters under the ``llama``/``qwen2`` keys, with ``key_length``/``value_length`` always written
  (a pruned model's ``head_dim`` is no longer ``hidden_size / num_attention_heads``);
- tensors renamed by ``gguf.get_tensor_name_map``; for ``llama`` the Q and K projections are permuted back
  from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one (Qwen2 uses NeoX RoPE in
  llama.cpp: no permutation); norms and other 1-D tensors stay F32; in Q8_0 a tensor whose rows are not a
  multiple of 32 falls back to F16, as the reference converter does; a tied output head is left out
  (llama.cpp then reads ``token_embd``);
- the tokenizer as ``gpt2`` BPE: every id's token text in id order, token types (special added tokens
  CONTROL, other added tokens USER_DEFINED), merges, special ids, chat template (``gguf.SpecialVocab``), the
  pre-tokenizer name (``gpt-2`` for a plain ByteLevel pre-tokenizer, ``qwen2`` for Qwen2's split regex: a
  tokenizer with anything else is refused, naming what it has), and whether BOS is added.

``verify_gguf`` loads the file with ``llama-cpp-python`` (llama.cpp itself), checks that llama.cpp tokenizes
each prompt into the Hugging Face tokenizer's ids, and compares greedy tokens with the HF model's.

    from r1ray.compress.gguf import export_gguf, verify_gguf
    path = export_gguf("outputs/runs/sft/final", "/tmp/model-q8_0.gguf", "q8_0")
    verify_gguf(path, "outputs/runs/sft/final", ["1 + 1 ="], max_tokens=16)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["GGUF_TYPES", "GGUFCheck", "export_gguf", "hf_greedy", "llama_cpp_available", "verify_gguf"]

GGUF_TYPES = ("f16", "q8_0")
_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def llama_cpp_available() -> tuple[bool, str]:
    """(True, "") when ``llama_cpp`` (llama-cpp-python) imports, else (False, why)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return False, (f"llama-cpp-python is not installed ({e}); install it from the wheel cache: "
                       "scripts/install.sh builds it once into ~/.cache/r1ray/wheels (see docs/compress.md)")
    return True, ""


def _permute(w: Any, n_head: int) -> Any:
    """Hugging Face's rotate-half Q/K rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; ValueError for one it does not know here."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
        if kinds == ["Split", "ByteLevel"] and "\\p{N}" in json.dumps(pre["pretokenizers"][0]):
            return "qwen2"
        raise ValueError(f"tokenizer pre-tokenizer Sequence{kinds} is not one llama.cpp knows here (ByteLevel, "
                         "or Qwen2's Split + ByteLevel); convert with llama.cpp's convert_hf_to_gguf.py instead")
    raise ValueError(f"tokenizer pre-tokenizer {pre.get('type')!r} is not byte-level BPE; GGUF export supports "
                     "r1ray's byte-level BPE tokenizers (gpt-2 or qwen2 pre-tokenizers)")


def _add_vocab(writer: Any, hf_dir: Path, vocab_size: int) -> None:
    import gguf

    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_dir)
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if (tj.get("model") or {}).get("type") != "BPE":
        raise ValueError(f"{hf_dir}/tokenizer.json: model type {(tj.get('model') or {}).get('type')!r} is not BPE")
    pre = _pre_tokenizer(tj)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError(f"{hf_dir}/tokenizer.json has no BPE merges")
    ids = tok("a", add_special_tokens=True)["input_ids"]
    # State what the HF tokenizer does, so llama.cpp does not fall back to its own per-type default.
    special.add_special_token.setdefault("bos", bool(ids) and ids[0] == tok.bos_token_id)
    special.add_special_token.setdefault("eos", bool(ids) and ids[-1] == tok.eos_token_id)
    special.add_to_gguf(writer, quiet=True)


def export_gguf(hf_dir: str | Path, out_path: str | Path, qtype: str = "f16") -> Path:
    """Write the HF model in ``hf_dir`` (unquantized safetensors) as a GGUF file of type ``qtype`` (f16, q8_0)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type must be one of {GGUF_TYPES}, got {qtype!r}")
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise ValueError(f"{hf_dir} is a quantized export ({cfg['quantization_config'].get('quant_method')}); "
                         "export GGUF from the unquantized model")
    arch_name = _ARCHS.get((cfg.get("architectures") or [None])[0])
    if arch_name is None:
        raise ValueError(f"{hf_dir}: architecture {cfg.get('architectures')} has no GGUF export here; "
                         f"supported: {sorted(_ARCHS)}")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{hf_dir}: rope_type {rope.get('rope_type')!r} is not exported here (only default RoPE)")
    n_layers = cfg["num_hidden_layers"]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(hf_dir.parent.name if hf_dir.name == "final" else hf_dir.name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    ftype = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(ftype)
    _add_vocab(writer, hf_dir, cfg["vocab_size"])

    names = gguf.get_tensor_name_map(arch, n_layers)
    want = gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    fallback = []
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} has no .safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                if key == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ValueError(f"{f.name}: tensor {key} has no GGUF name for {arch_name}")
                data = st.get_tensor(key).float().numpy()
                if arch_name == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
                    data = _permute(data, n_head)
                elif arch_name == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
                    data = _permute(data, n_kv)
                if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
                    writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
                    continue
                try:
                    packed = gguf.quants.quantize(np.ascontiguousarray(data), want)
                    kind = want
                except gguf.QuantError as e:
                    fallback.append(f"{name} ({e})")
                    kind = gguf.GGMLQuantizationType.F16
                    packed = gguf.quants.quantize(np.ascontiguousarray(data), kind)
                writer.add_tensor(name, packed, raw_dtype=kind)
    if fallback:
        log.warning("GGUF %s: %d tensor(s) not divisible into Q8_0 blocks written as F16 (prune with "
                    "mlp_multiple_of=32 to avoid it): %s", qtype, len(fallback), "; ".join(fallback[:4]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)
    log.info("GGUF %s written: %s (%.1f MB)", qtype, out_path, out_path.stat().st_size / 1e6)
    return out_path


@dataclass
class GGUFCheck:
    """What llama.cpp did with a GGUF file, next to the Hugging Face model."""

    path: str
    qtype: str
    size_bytes: int
    tokenizer_match: float
    """Share of prompts llama.cpp tokenized into exactly the Hugging Face tokenizer's ids."""
    greedy_match: float
    """Share of prompts whose greedy tokens equal the Hugging Face model's."""
    decode_tokens_per_s: float
    """llama.cpp's greedy decode speed at batch 1 (tokens after the prompt)."""
    logits_rel_err: float = 0.0
    """Largest |llama.cpp logit - HF logit| over every prompt position, over the largest |HF logit|."""
    mismatches: list[dict[str, Any]] = field(default_factory=list)


def _stop_ids(tok: Any) -> set[int]:
    ids = {tok.eos_token_id}
    t = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(t, int) and t != tok.unk_token_id:
        ids.add(t)
    return {i for i in ids if i is not None}


def hf_greedy(model: Any, prompt_ids: list[list[int]], max_tokens: int, stop: set[int]) -> list[list[int]]:
    """Greedy continuation of each prompt by a transformers model, up to and including a stop token."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(stop),
                                 pad_token_id=sorted(stop)[0])
            out.append(gen[0, len(ids):].tolist())
    return out


def _llama_greedy(llm: Any, ids: list[int], max_tokens: int, stop: set[int]
                  ) -> tuple[list[int], float, int, Any]:
    """(greedy tokens, decode seconds, tokens decoded, the prompt positions' logits)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
    out: list[int] = []
    t0 = time.perf_counter()
    decoded = 0
    while len(out) < max_tokens:
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt in stop or len(out) == max_tokens:
            break
        llm.eval([nxt])
        decoded += 1
    return out, time.perf_counter() - t0, decoded, prompt_logits


def verify_gguf(gguf_path: str | Path, hf_dir: str | Path, prompts: list[str], *, max_tokens: int = 16,
                qtype: str = "", n_threads: int | None = None) -> GGUFCheck:
    """Load ``gguf_path`` in llama.cpp and compare tokenization and greedy tokens with the HF model in
    ``hf_dir`` on ``prompts``. RuntimeError when llama-cpp-python is missing."""
    import torch

    from r1ray.model.build import load_model
    from r1ray.model.tokenizer import load_tokenizer

    ok, why = llama_cpp_available()
    if not ok:
        raise RuntimeError(why)
    from llama_cpp import Llama

    tok = load_tokenizer(hf_dir)
    stop = _stop_ids(tok)
    hf_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(not ids for ids in hf_ids):
        raise ValueError("gguf.prompts: every prompt must hold at least one token")
    model = load_model(hf_dir, dtype=torch.float32).eval()
    ref = hf_greedy(model, hf_ids, max_tokens, stop)
    longest = max(len(i) for i in hf_ids) + max_tokens + 8
    # logits_all: llama-cpp-python 0.3 keeps no logits in `scores` without it (its sampler reads them in C)
    llm = Llama(model_path=str(gguf_path), n_ctx=max(64, longest), n_batch=max(64, longest), verbose=False,
                logits_all=True,
                n_threads=n_threads or torch.get_num_threads(), seed=0)
    tok_ok, greedy_ok, mismatches = 0, 0, []
    secs, decoded, err = 0.0, 0, 0.0
    for prompt, ids, want in zip(prompts, hf_ids, ref, strict=True):
        ll_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        tok_ok += ll_ids == ids
        got, s, n, ll_logits = _llama_greedy(llm, ids, max_tokens, stop)
        secs, decoded = secs + s, decoded + n
        with torch.no_grad():
            hf_logits = model(torch.tensor([ids])).logits[0].numpy()
        err = max(err, float(abs(ll_logits - hf_logits).max() / abs(hf_logits).max()))
        if got == want:
            greedy_ok += 1
        else:
            mismatches.append({"prompt": prompt, "hf": want, "llama_cpp": got, "llama_cpp_prompt_ids": ll_ids})
    check = GGUFCheck(str(gguf_path), qtype, Path(gguf_path).stat().st_size, tok_ok / len(prompts),
                      greedy_ok / len(prompts), decoded / secs if secs > 0 else 0.0, err, mismatches)
    log.info("llama.cpp %s: tokenizer match %.2f, greedy match %.2f, logits rel. error %.2g, %.1f tokens/s",
             Path(gguf_path).name, check.tokenizer_match, check.greedy_match, err, check.decode_tokens_per_s)
    return check
