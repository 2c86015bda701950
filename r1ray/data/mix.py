"""Domain mixing and the train/validation split: pure functions of (seed, document id).

Mixing up- or down-samples each source to a target share of training tokens. Token counts are estimated
before tokenizing from each source's kept characters times its tokens-per-character measured on the
tokenizer sample; the manifest records both the target and the realised share. A source at rate ``r``
keeps each document ``floor(r)`` times plus once more with probability ``r - floor(r)``; repeats go to
later passes over the corpus, so a repeated document never sits next to itself.
"""

from __future__ import annotations

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def doc_uniform(seed: int, salt: int, source: np.ndarray, file: np.ndarray, pos: np.ndarray,
                part: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per document from its id (splitmix64 of the packed id)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ (np.uint64(salt) << np.uint64(56))
        for v in (source, file, pos, part):
            x = x ^ v.astype(np.int64).view(np.uint64)
            x = (x ^ (x >> np.uint64(30))) * _M1
            x = (x ^ (x >> np.uint64(27))) * _M2
            x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def mixing_rates(est_tokens: dict[str, float], weights: dict[str, float] | None) -> dict[str, float]:
    """Sampling rate per source so that its share of tokens is its normalised weight; total stays equal."""
    if not weights:
        return dict.fromkeys(est_tokens, 1.0)
    total = sum(est_tokens.values())
    wsum = sum(weights.values())
    rates = {}
    for name, t in est_tokens.items():
        rates[name] = (weights[name] / wsum) * total / t if t > 0 else 0.0
    return rates


def multiplicities(rate: float, u: np.ndarray) -> np.ndarray:
    """How many times each document is used at ``rate`` (``u``: its uniform number)."""
    base = int(np.floor(rate))
    return (base + (u < rate - base)).astype(np.int64)
