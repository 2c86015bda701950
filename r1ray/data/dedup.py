"""Exact and near-duplicate detection: content hashes, MinHash signatures, LSH clustering.

Signatures are computed inside Ray Data tasks, a batch at a time, vectorised in numpy: words are hashed
once (xxh3), word n-gram shingles are combined from the word hashes with a rolling polynomial, and the
``num_perm`` permutations are multiply-shift hashes applied to the whole batch's shingles as one matrix,
reduced per document with ``np.minimum.reduceat``. (datasketch, the reference, hashes every shingle with
SHA-1 in Python and updates one document at a time; this is the same estimator at a fraction of the cost,
see docs/data.md.)

Clustering runs on the driver over the small per-document keys (8 bytes per band plus the signature):
documents that share a band key are candidates; a candidate joins its bucket's first document when the
signatures estimate a Jaccard similarity >= threshold; union-find joins the pairs; in every cluster the
document that comes first in corpus order is kept. Deterministic for the same corpus and config.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

_WORD_RE = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)
_ROLL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) for the rolling combine


def normalized_for_hash(text: str) -> str:
    """NFKC, lower case, whitespace collapsed: equal strings here are exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_hash(text: str) -> int:
    """64-bit hash of the normalised content (as a signed int64, Parquet-friendly)."""
    return xxhash.xxh3_64_intdigest(normalized_for_hash(text).encode()) - (1 << 63)


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def word_hashes(text: str) -> np.ndarray:
    """uint64 hash of every word of ``text`` (lower-cased ``\\w+`` tokens)."""
    h = xxhash.xxh3_64_intdigest
    return np.fromiter((h(w.encode()) for w in words(text)), dtype=np.uint64)


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every word n-gram, from the word hashes (a text shorter than n gives one shingle)."""
    if len(wh) == 0:
        return wh
    if len(wh) < n:
        n = len(wh)
    m = len(wh) - n + 1
    acc = wh[:m].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            acc = acc * _ROLL + wh[j : j + m]
    return acc


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` of the multiply-shift hash family: perm_i(x) = ((a_i * x + b_i) mod 2^64) >> 32."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def signatures(shingle_sets: list[np.ndarray], a: np.ndarray, b: np.ndarray, chunk: int = 32768) -> np.ndarray:
    """MinHash signatures (``len(shingle_sets) x num_perm``, uint32) of many documents at once.

    Documents without shingles get all-ones signatures (and are left out of LSH by ``band_keys``).
    """
    num_perm = len(a)
    out = np.full((len(shingle_sets), num_perm), 0xFFFFFFFF, dtype=np.uint32)
    lengths = np.array([len(s) for s in shingle_sets], dtype=np.int64)
    nonempty = np.flatnonzero(lengths)
    if len(nonempty) == 0:
        return out
    # Process documents in groups whose shingles total about `chunk`, each group as one matrix.
    start = 0
    while start < len(nonempty):
        stop, total = start, 0
        while stop < len(nonempty) and (total == 0 or total + lengths[nonempty[stop]] <= chunk):
            total += lengths[nonempty[stop]]
            stop += 1
        idx = nonempty[start:stop]
        x = np.concatenate([shingle_sets[i] for i in idx])
        with np.errstate(over="ignore"):
            h = ((x[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
        offsets = np.concatenate([[0], np.cumsum(lengths[idx])[:-1]])
        out[idx] = np.minimum.reduceat(h, offsets, axis=0)
        start = stop
    return out


def band_keys(sig: np.ndarray, bands: int, rows: int, has_shingles: np.ndarray) -> np.ndarray:
    """``n x bands`` int64 bucket keys; a document without shingles gets key 0 in every band (ignored)."""
    n = sig.shape[0]
    s = sig.reshape(n, bands, rows).astype(np.uint64)
    acc = np.arange(1, bands + 1, dtype=np.uint64)[None, :] * np.uint64(0xD6E8FEB86659FD93)
    acc = np.broadcast_to(acc, (n, bands)).copy()
    with np.errstate(over="ignore"):
        for r in range(rows):
            acc = (acc ^ s[:, :, r]) * np.uint64(0x100000001B3)
            acc ^= acc >> np.uint64(29)
    keys = acc.view(np.int64)
    keys[keys == 0] = 1
    keys[~has_shingles] = 0
    return keys


def doc_signature(text: str, shingle_size: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return signatures([np.unique(ngram_hashes(word_hashes(text), shingle_size))], a, b)[0]


# ---------------------------------------------------------------------------------------------------
# Driver-side clustering
# ---------------------------------------------------------------------------------------------------


def exact_duplicates(hashes: np.ndarray) -> np.ndarray:
    """Boolean mask: True for every document whose hash appeared earlier (the first one is kept)."""
    _, first = np.unique(hashes, return_index=True)
    dup = np.ones(len(hashes), dtype=bool)
    dup[first] = False
    return dup


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


def near_duplicates(keys: np.ndarray, sigs: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """Boolean mask of near-duplicates to drop (all but the first of each cluster), and the candidate count.

    ``keys`` (n x bands) and ``sigs`` (n x num_perm) are in corpus order; rows whose keys are 0 take no part.
    """
    n = keys.shape[0]
    parent = np.arange(n, dtype=np.int64)
    candidates = 0
    for band in range(keys.shape[1]):
        k = keys[:, band]
        order = np.argsort(k, kind="stable")
        sk = k[order]
        same = np.flatnonzero((sk[1:] == sk[:-1]) & (sk[1:] != 0)) + 1  # positions whose key equals the one before
        if len(same) == 0:
            continue
        # The anchor of each position is the first element of its run (the smallest corpus index).
        run_start = np.ones(len(sk), dtype=bool)
        run_start[same] = False
        anchor_pos = np.maximum.accumulate(np.where(run_start, np.arange(len(sk)), 0))
        members, anchors = order[same], order[anchor_pos[same]]
        candidates += len(members)
        est = (sigs[members] == sigs[anchors]).mean(axis=1)
        for m, a in zip(members[est >= threshold].tolist(), anchors[est >= threshold].tolist(), strict=True):
            ra, rm = _find(parent, a), _find(parent, m)
            if ra != rm:
                parent[max(ra, rm)] = min(ra, rm)  # the root is always the earliest document
    roots = np.array([_find(parent, i) for i in range(n)], dtype=np.int64) if n else parent
    return roots != np.arange(n), candidates


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0
