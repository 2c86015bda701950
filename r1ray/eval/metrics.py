"""Evaluation metrics as pure functions: perplexity and bits, exact match, pass@k, maj@k, a paired bootstrap
confidence interval, BLEU and ROUGE.

No Ray, no torch: the evaluation run, the training stages' in-loop evaluation and the tests call these
directly. BLEU is ``sacrebleu``'s (the reference implementation the field reports, with its standard 13a
tokenization) and ROUGE is Google's ``rouge-score`` (the package the ROUGE numbers in papers come from),
rather than our own re-implementations.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from r1ray.tasks.accuracy import maj_at_k, pass_at_k  # noqa: F401 - part of this module's API

__all__ = [
    "BootstrapCI",
    "bits_per_byte",
    "bits_per_token",
    "bleu",
    "exact_match",
    "maj_at_k",
    "normalize_text",
    "paired_bootstrap",
    "pass_at_k",
    "perplexity",
    "rouge",
    "sentence_bleu",
]

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------------------


def _check_counts(nll_sum: float, count: float, what: str) -> None:
    if count <= 0:
        raise ValueError(f"{what}: the count must be > 0, got {count}")
    if not math.isfinite(nll_sum) or nll_sum < 0:
        raise ValueError(f"{what}: the summed negative log-likelihood must be finite and >= 0, got {nll_sum}")


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)``: the perplexity of ``n_tokens`` predicted tokens whose negative
    log-likelihoods (natural log) sum to ``nll_sum``."""
    _check_counts(nll_sum, n_tokens, "perplexity")
    return math.exp(nll_sum / n_tokens)


def bits_per_token(nll_sum: float, n_tokens: int) -> float:
    """Mean negative log2-likelihood per predicted token."""
    _check_counts(nll_sum, n_tokens, "bits_per_token")
    return nll_sum / n_tokens / _LN2


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Negative log2-likelihood per UTF-8 byte of the predicted text: comparable across tokenizers."""
    _check_counts(nll_sum, n_bytes, "bits_per_byte")
    return nll_sum / n_bytes / _LN2


# --------------------------------------------------------------------------------------------------
# Exact match, pass@k, maj@k
# --------------------------------------------------------------------------------------------------

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (SQuAD's normalisation without the article rule)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str | None, reference: str, *, normalize: bool = True) -> float:
    """1.0 when ``prediction`` equals ``reference`` (after ``normalize_text`` unless ``normalize=False``), else 0.0.
    A missing prediction (None) is 0.0."""
    if prediction is None:
        return 0.0
    if normalize:
        return float(normalize_text(prediction) == normalize_text(reference))
    return float(prediction == reference)


# --------------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapCI:
    """``diff`` = statistic(b) - statistic(a) on the full paired sample, and its ``level`` confidence interval."""

    diff: float
    low: float
    high: float
    level: float
    resamples: int
    n: int

    def __str__(self) -> str:
        return f"{self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({self.level:.0%} CI, n={self.n})"


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, weights: Sequence[float] | None = None,
                     resamples: int = 2000, level: float = 0.95, seed: int = 0) -> BootstrapCI:
    """Percentile bootstrap CI of the difference ``mean(b) - mean(a)`` between two models' scores on the same
    items (``a[i]`` and ``b[i]`` are item i's scores): items are resampled with replacement, both models
    together (paired), ``resamples`` times from ``numpy.random.default_rng(seed)``, so the interval is a pure
    function of the arguments. With ``weights`` the statistic is the weighted mean ``sum(w*x)/sum(w)`` (for
    per-row NLL per token weighted by the row's tokens, that is the corpus NLL per token)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_bootstrap: a and b must be 1-D and paired, got {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError("paired_bootstrap: no items")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"paired_bootstrap: resamples must be >= 1, got {resamples}")
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != x.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("paired_bootstrap: weights must be non-negative, one per item, and not all zero")
    d = y - x
    diff = float((w * d).sum() / w.sum())
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    n = len(x)
    for start in range(0, resamples, 256):  # in chunks: resamples x n indices at once can be large
        m = min(256, resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        ws = w[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[start:start + m] = (ws * d[idx]).sum(1) / ws.sum(1)
    stats = stats[np.isfinite(stats)]  # a resample of only zero-weight items has no mean
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return BootstrapCI(diff=diff, low=float(lo), high=float(hi), level=level, resamples=resamples, n=n)


# --------------------------------------------------------------------------------------------------
# Reference-based generation
# --------------------------------------------------------------------------------------------------


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of ``hypotheses`` against one reference each: ``sacrebleu.corpus_bleu`` with its
    defaults (13a tokenization, exponential smoothing off), the number the field reports."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("bleu: no hypotheses")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Sentence BLEU (0-100, sacrebleu's smoothed sentence score) of one pair: for per-item audit lines."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str], *, types: Sequence[str] = ROUGE_TYPES,
          ) -> dict[str, list[float]]:
    """Per-item ROUGE F1 (0-1) for each type, by ``rouge_score.RougeScorer`` with the Porter stemmer (the
    setting of most summarisation papers). Average the lists for corpus numbers."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"rouge: {len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    out: dict[str, list[float]] = {t: [] for t in types}
    for h, r in zip(hypotheses, references, strict=True):
        s = scorer.score(r, h)  # (target, prediction)
        for t in types:
            out[t].append(float(s[t].fmeasure))
    return out
