"""Byte-level BPE tokenizers with the chat and reasoning tokens every later stage relies on.

Saved as a directory that ``AutoTokenizer.from_pretrained`` loads. By default numbers are split into single digits
before BPE (``split_digits``, as Qwen2, Llama 1/2 and DeepSeek tokenizers do): the pre-tokenizer is Qwen2's split
regex (each digit a piece of its own, the space before a number a piece of its own) followed by the byte-level
mapping, which llama.cpp knows as ``qwen2``, so a GGUF export tokenizes exactly as the Hugging Face tokenizer does.
A model then computes with digits instead of memorising one token per number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
REASONING_TOKENS = [THINK, END_THINK, ANSWER, END_ANSWER]

# ChatML turns; an assistant message may carry `reasoning_content`, rendered inside <think>...</think>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') -%}"
    "{{ '<think>\n' + message['reasoning_content'] + '\n</think>\n' }}"
    "{%- endif -%}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """``CHAT_TEMPLATE`` rendered without a tokenizer (the data stage writes chat-form documents before any
    tokenizer exists); ``tests/unit/test_model.py`` checks it equals ``apply_chat_template``."""
    out = []
    for m in messages:
        out.append(f"{IM_START}{m['role']}\n")
        if m["role"] == "assistant" and m.get("reasoning_content"):
            out.append(f"{THINK}\n{m['reasoning_content']}\n{END_THINK}\n")
        out.append(f"{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                 r"\s+(?!\S)|\s+")
r"""With ``split_digits``: Qwen2's pre-tokenizer regex (llama.cpp's ``qwen2``): every digit (``\p{N}``) a piece of its own."""


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 4096, min_frequency: int = 2,
                    split_digits: bool = True):
    """Train a byte-level BPE on ``texts`` and save it with the special tokens and chat template.

    ``split_digits``: Qwen2's pre-tokenizer (each digit a piece of its own), so no token ever holds two digits; off:
    GPT-2's byte-level split, where BPE merges runs of digits. Deterministic for the same texts in the same order. Returns the loaded
    ``PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split_digits:  # exactly Qwen2's tokenizer.json layout: the split regex, then the byte mapping alone
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # Loaded back from the files, by the class AutoTokenizer resolves them to (tokenizer_config.json names it;
    # tests load these directories with AutoTokenizer), without AutoTokenizer's 1.2 s import of torch.
    return _checked(PreTrainedTokenizerFast.from_pretrained(str(out)), out)


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory with the real loading code; fail clearly if reasoning tokens are missing."""
    from transformers import AutoTokenizer

    return _checked(AutoTokenizer.from_pretrained(str(path)), path)


def token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` as one token of ``tokenizer``'s vocabulary, or None when it has none (the tokenizer
    would map it to its unknown token)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


def stop_token_ids(tokenizer) -> set[int]:
    """The ids that end a generation: EOS, and ``<|im_end|>`` (the end of a chat turn) where the vocabulary has it."""
    return {i for i in (tokenizer.eos_token_id, token_id(tokenizer, IM_END)) if i is not None}


def _checked(tok, path: str | Path):
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; r1ray packs documents with EOS separators")
    return tok


def tokenizer_sha256(path: str | Path) -> str:
    """Hash of the files that define tokenization (``tokenizer.json`` and its config)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = Path(path) / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()
