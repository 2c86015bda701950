"""A loaded tokenizer without the reasoning tokens is refused with a fix that works (no Ray needed)."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from r1ray.data.pipeline import check_reasoning_tokens
from r1ray.model.tokenizer import REASONING_TOKENS


def test_missing_reasoning_tokens_error_names_them_and_its_fix_works(tmp_path):
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel()
    core.train_from_iterator(["some text to learn from"] * 10,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(REASONING_TOKENS))) as e:
        check_reasoning_tokens(tok, str(tmp_path))
    # The message's recipe, run as written, makes the same tokenizer acceptable.
    recipe = str(e.value).split("save it again: ", 1)[1]
    exec(recipe.replace("(path)", f"({str(tmp_path)!r})"), {"transformers": __import__("transformers")})
    fixed = AutoTokenizer.from_pretrained(tmp_path)
    check_reasoning_tokens(fixed, str(tmp_path))
    assert all(len(fixed.tokenize(t)) == 1 for t in REASONING_TOKENS)
