"""Evaluation-set decontamination: documents sharing a word n-gram (e.g. 13 words) with an eval file go.

The eval n-grams are hashed with the same word hashing as MinHash (``r1ray.data.dedup``), kept as one
sorted uint64 array (8 bytes per n-gram) that Ray ships once to every task; a document is contaminated
when any of its n-gram hashes is in that array (``np.isin``).
"""

from __future__ import annotations

import json

import numpy as np

from r1ray.artifacts import read_bytes
from r1ray.data.dedup import ngram_hashes, word_hashes


def eval_texts(path: str, fields: list[str]) -> list[str]:
    """Texts of one eval file: jsonl values of ``fields`` (every line that parses), or the whole text."""
    raw = read_bytes(path).decode("utf-8", "replace")
    if path.lower().endswith((".jsonl", ".json", ".ndjson")):
        out = []
        for line in raw.splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.extend(str(obj[f]) for f in fields if isinstance(obj.get(f), (str, int, float)))
        return out
    return [raw]


def eval_ngrams(files: list[str], fields: list[str], n: int) -> np.ndarray:
    """Sorted unique uint64 hashes of every word n-gram in the eval files (texts shorter than n are skipped)."""
    parts = []
    for f in files:
        for text in eval_texts(f, fields):
            wh = word_hashes(text)
            if len(wh) >= n:
                parts.append(ngram_hashes(wh, n))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def contaminated(wh: np.ndarray, eval_set: np.ndarray, n: int) -> bool:
    """True when the document (given by its word hashes) shares an n-gram with the eval set."""
    if len(eval_set) == 0 or len(wh) < n:
        return False
    return bool(np.isin(ngram_hashes(wh, n), eval_set, assume_unique=False).any())
