"""Labelled near-duplicate corpora: the yardstick for near-dedup precision and recall.

``labelled_near_duplicates`` writes random documents plus edited copies at known similarity (random
word substitutions at rates that put the copies on both sides of the threshold) and labels every
document with the truth: is it a near-duplicate (true word-shingle Jaccard >= threshold) of an earlier
document? Tests and ``benchmarks/data_pipeline.py`` score any dedup against it with ``score``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r1ray.data.dedup import jaccard, words

EDIT_RATES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2, 0.35)


@dataclass(frozen=True)
class Labelled:
    texts: list[str]
    is_duplicate: np.ndarray
    """True for documents whose shingle Jaccard with some earlier document is >= the threshold."""
    true_jaccard: np.ndarray
    """Highest shingle Jaccard with an earlier document (0 for originals)."""


def _vocab(rng: np.random.Generator, n: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters, size=int(rng.integers(2, 9)))))
    return sorted(out)


def shingle_set(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def labelled_near_duplicates(n_base: int = 400, *, seed: int = 0, words_per_doc: tuple[int, int] = (80, 300),
                             copies: tuple[int, int] = (0, 3), threshold: float = 0.8,
                             shingle_size: int = 5) -> Labelled:
    """``n_base`` random documents (Zipf word frequencies) each followed later by 0-3 edited copies."""
    rng = np.random.default_rng(seed)
    vocab = _vocab(rng, 5000)
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    bases, docs = [], []
    for _ in range(n_base):
        n = int(rng.integers(*words_per_doc))
        bases.append([vocab[i] for i in rng.choice(len(vocab), size=n, p=p)])
    for bi, base in enumerate(bases):
        docs.append((bi, base))
    # Copies come after all originals, each an edit of its base at a rate drawn from EDIT_RATES.
    for bi, base in enumerate(bases):
        for _ in range(int(rng.integers(copies[0], copies[1] + 1))):
            rate = float(rng.choice(EDIT_RATES))
            w = list(base)
            for i in np.flatnonzero(rng.random(len(w)) < rate):
                w[i] = vocab[int(rng.integers(len(vocab)))]
            docs.append((bi, w))
    texts = [" ".join(w).capitalize() + "." for _, w in docs]
    sets = [shingle_set(t, shingle_size) for t in texts]
    seen: dict[int, list[int]] = {}
    best = np.zeros(len(docs))
    for i, (bi, _) in enumerate(docs):
        earlier = seen.setdefault(bi, [])
        best[i] = max((jaccard(sets[i], sets[j]) for j in earlier), default=0.0)
        earlier.append(i)
    return Labelled(texts=texts, is_duplicate=best >= threshold, true_jaccard=best)


def score(dropped: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision and recall of the dropped documents against the truth (and the raw counts)."""
    tp = int((dropped & truth).sum())
    fp = int((dropped & ~truth).sum())
    fn = int((~dropped & truth).sum())
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "tp": tp, "fp": fp, "fn": fn,
    }


def inject_near_duplicates(texts: list[str], *, seed: int = 0, copy_fraction: float = 0.1,
                           edit_rates: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06),
                           threshold: float = 0.8, shingle_size: int = 5) -> Labelled:
    """A real corpus with copies injected: ``copy_fraction`` of the documents get one copy each, placed at a
    random later position, with a share of whitespace-separated tokens (``edit_rates``, 0 = an exact copy)
    replaced by tokens drawn from the corpus. The copies are labelled by their true shingle Jaccard with
    their original; the originals are labelled False, so near-twins the corpus already holds must be told
    apart by the caller (``benchmarks/data_pipeline.py`` checks every such drop on its true Jaccard)."""
    rng = np.random.default_rng(seed)
    pool = [t for text in texts[: max(1, len(texts) // 10)] for t in text.split()][:200_000]
    chosen = np.sort(rng.choice(len(texts), size=int(len(texts) * copy_fraction), replace=False))
    # (sort key, text, true Jaccard): a copy's key lies after its original's, so the original comes first in
    # corpus order and is the one kept.
    docs = [(float(i), t, 0.0) for i, t in enumerate(texts)]
    for i in chosen.tolist():
        tokens = texts[i].split(" ")  # keeps newlines and indentation inside tokens
        rate = float(rng.choice(edit_rates))
        for k in np.flatnonzero(rng.random(len(tokens)) < rate).tolist():
            tokens[k] = pool[int(rng.integers(len(pool)))] if pool else tokens[k]
        copy = " ".join(tokens)
        j = jaccard(shingle_set(texts[i], shingle_size), shingle_set(copy, shingle_size))
        docs.append((float(rng.uniform(i + 0.5, len(texts))), copy, j))
    docs.sort(key=lambda d: d[0])
    return Labelled(texts=[t for _, t, _ in docs], is_duplicate=np.array([j >= threshold for _, _, j in docs]),
                    true_jaccard=np.array([j for _, _, j in docs]))
