"""r1ray.eval.metrics against hand-computed values and reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from r1ray.eval import metrics as M


def test_perplexity_and_bits():
    nll = 4 * math.log(2.0)  # four tokens, each at probability 1/2
    assert M.perplexity(nll, 4) == pytest.approx(2.0)
    assert M.bits_per_token(nll, 4) == pytest.approx(1.0)
    assert M.bits_per_byte(nll, 8) == pytest.approx(0.5)
    assert M.perplexity(0.0, 3) == 1.0
    with pytest.raises(ValueError, match="count must be > 0"):
        M.perplexity(1.0, 0)
    with pytest.raises(ValueError, match="finite"):
        M.bits_per_token(float("nan"), 3)


def test_pass_at_k_hand_values_and_binomial_form():
    assert M.pass_at_k(5, 2, 1) == pytest.approx(0.4)  # 1 - C(3,1)/C(5,1)
    assert M.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert M.pass_at_k(5, 2, 4) == 1.0  # only 3 wrong samples: any 4 hold a correct one
    assert M.pass_at_k(5, 0, 3) == 0.0
    assert M.pass_at_k(5, 5, 1) == 1.0
    for n, c, k in [(10, 3, 1), (10, 3, 5), (200, 3, 50), (200, 150, 100), (1000, 1, 999)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert M.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    # pass@1 is the fraction correct
    assert M.pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            M.pass_at_k(*bad)


def test_maj_at_k_votes_ties_and_abstentions():
    answers = ["3", "4", "4", None, "3"]
    scores = [1.0, 0.0, 0.0, 0.0, 1.0]
    assert M.maj_at_k(answers, scores, 1) == 1.0
    assert M.maj_at_k(answers, scores, 3) == 0.0  # "4" twice beats "3" once
    assert M.maj_at_k(answers, scores, 5) == 1.0  # 2-2 tie: the answer seen first wins
    assert M.maj_at_k([None, None], [0.0, 0.0], 2) == 0.0
    assert M.maj_at_k([None, "7"], [0.0, 1.0], 2) == 1.0  # no answer does not vote
    with pytest.raises(ValueError, match="1 <= k"):
        M.maj_at_k(answers, scores, 6)


def test_exact_match_normalisation():
    assert M.exact_match("  The Answer, is 42. ", "the answer is 42") == 1.0
    assert M.exact_match("42", "41") == 0.0
    assert M.exact_match("A", "a", normalize=False) == 0.0
    assert M.exact_match(None, "x") == 0.0


def test_paired_bootstrap_is_seeded_and_covers_known_shifts():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 300).astype(float)
    shift = M.paired_bootstrap(a, a + 1.0)
    assert (shift.diff, shift.low, shift.high) == (1.0, 1.0, 1.0)
    same = M.paired_bootstrap(a, a)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    b = np.where(rng.random(300) < 0.2, 1 - a, a)  # flip 20% of the items
    ci = M.paired_bootstrap(a, b, seed=3)
    assert ci == M.paired_bootstrap(a, b, seed=3)
    assert ci.diff == pytest.approx(b.mean() - a.mean())
    assert ci.low < ci.diff < ci.high
    # agrees with scipy's paired percentile bootstrap (different random streams: a loose tolerance)
    from scipy.stats import bootstrap

    ref = bootstrap((a, b), lambda x, y: np.mean(y - x), paired=True, vectorized=False, n_resamples=2000,
                    method="percentile", random_state=0).confidence_interval
    assert ci.low == pytest.approx(ref.low, abs=0.01) and ci.high == pytest.approx(ref.high, abs=0.01)
    # weighted: the statistic is sum(w * d) / sum(w)
    w = rng.integers(1, 10, 300).astype(float)
    assert M.paired_bootstrap(a, b, weights=w).diff == pytest.approx(((b - a) * w).sum() / w.sum())
    with pytest.raises(ValueError, match="paired"):
        M.paired_bootstrap([1.0, 2.0], [1.0])


def test_bleu_and_rouge_hand_values():
    refs = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    assert M.bleu(refs, refs) == pytest.approx(100.0)
    assert M.bleu(["zzz qqq", "xxx yyy"], refs) == pytest.approx(0.0)
    assert M.sentence_bleu(refs[0], refs[0]) == pytest.approx(100.0)
    r = M.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"][0] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 3/3, R = 3/6
    assert r["rouge2"][0] == pytest.approx(2 * 1.0 * 0.4 / 1.4)  # P = 2/2, R = 2/5
    assert r["rougeL"][0] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert M.rouge(["cats sitting"], ["cat sits"])["rouge1"][0] == pytest.approx(1.0)  # Porter stemmer
