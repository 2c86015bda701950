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


def validation_split(u: np.ndarray, n_chars: np.ndarray, source: np.ndarray, keep: np.ndarray,
                     fraction: float) -> np.ndarray:
    """Which documents go to validation: per source, ``fraction`` of its kept *characters* (a proxy for
    tokens), taken in the order of ``u`` (a per-document hash), so validation mirrors the sources' shares
    of training text. A plain per-document coin would let a source of many short documents dominate
    validation and leave one of few long documents nearly absent.

    A document that would carry its source past the target is skipped (a later, shorter one may fit), so a
    source whose every document is larger than its share contributes none rather than a whole book.
    """
    is_val = np.zeros(len(u), dtype=bool)
    if fraction <= 0:
        return is_val
    for si in np.unique(source[keep]):
        idx = np.flatnonzero(keep & (source == si))
        idx = idx[np.argsort(u[idx], kind="stable")]
        target = fraction * float(n_chars[idx].sum())
        # Fast path: the prefix that fits entirely; then a greedy pass over the rest for the remainder.
        cum = np.cumsum(n_chars[idx])
        cut = int(np.searchsorted(cum, target, side="right"))
        is_val[idx[:cut]] = True
        taken = float(cum[cut - 1]) if cut else 0.0
        for i in idx[cut:]:
            if taken >= target:
                break
            if taken + n_chars[i] <= target:
                is_val[i] = True
                taken += float(n_chars[i])
    return is_val
