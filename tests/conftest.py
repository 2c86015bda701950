"""Shared fixtures. Ray-using tests live under tests/ray and share one module-scoped local Ray."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer trained here (no downloads), with the reasoning tokens."""
    from r1ray.model.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    words = "the a of to and in is it that for on with as was he she they we you at by".split()
    texts = [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(30)) + f" {i} + {i + 3} = {2 * i + 3}."
        for i in range(400)
    ]
    train_tokenizer(texts, out, vocab_size=400)
    return out
