"""Mixing rates and multiplicities, the per-document hash, and eval n-gram decontamination."""

from __future__ import annotations

import json

import numpy as np
import pytest

from r1ray.data.decontam import contaminated, eval_ngrams
from r1ray.data.dedup import word_hashes
from r1ray.data.mix import doc_uniform, mixing_rates, multiplicities, validation_split


def test_rates_hit_target_shares_and_keep_the_total():
    est = {"web": 900.0, "code": 100.0}
    rates = mixing_rates(est, {"web": 1.0, "code": 1.0})
    assert rates == pytest.approx({"web": 500 / 900, "code": 5.0})
    assert sum(est[k] * rates[k] for k in est) == pytest.approx(1000.0)
    assert mixing_rates(est, None) == {"web": 1.0, "code": 1.0}


def test_multiplicities_average_to_the_rate():
    u = doc_uniform(0, 3, np.zeros(100_000), np.zeros(100_000), np.arange(100_000), np.zeros(100_000))
    for rate in (0.25, 1.0, 2.6):
        m = multiplicities(rate, u)
        assert m.mean() == pytest.approx(rate, abs=0.01)
        assert set(np.unique(m)) <= {int(np.floor(rate)), int(np.floor(rate)) + 1}


def test_doc_uniform_is_deterministic_uniform_and_seeded():
    ids = [np.arange(50_000) % 3, np.arange(50_000) % 7, np.arange(50_000), np.zeros(50_000)]
    u = doc_uniform(0, 1, *ids)
    assert np.array_equal(u, doc_uniform(0, 1, *ids))
    assert not np.array_equal(u, doc_uniform(1, 1, *ids)) and not np.array_equal(u, doc_uniform(0, 2, *ids))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert abs((u < 0.02).mean() - 0.02) < 0.003


def test_decontamination_needs_a_full_shared_ngram(tmp_path):
    question = "what is the total number of apples that the farmer has after selling half of them today"
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": question, "answer": 7}) + "\nnot json\n")
    eval_set = eval_ngrams([str(tmp_path / "eval.jsonl")], ["question"], 13)
    assert len(eval_set) == len(question.split()) - 13 + 1
    leaked = "Intro text. " + " ".join(question.split()[2:15]).upper() + " and more."
    assert contaminated(word_hashes(leaked), eval_set, 13)
    twelve = "Intro text. " + " ".join(question.split()[2:14]) + " and more."
    assert not contaminated(word_hashes(twelve), eval_set, 13)
    (tmp_path / "eval.txt").write_text(question)
    assert np.array_equal(eval_ngrams([str(tmp_path / "eval.txt")], [], 13), eval_set)


def test_validation_split_mirrors_each_sources_share_of_text():
    """Source 0: 200 long documents; source 1: 20,000 short ones; equal text. A per-document coin puts
    ~99% of validation text in source 1; the split takes 2% of each source's characters instead."""
    n0, n1 = 200, 20_000
    src = np.r_[np.zeros(n0, np.int64), np.ones(n1, np.int64)]
    n_chars = np.r_[np.full(n0, 10_000), np.full(n1, 100)].astype(np.int64)
    ids = np.arange(n0 + n1)
    u = doc_uniform(0, 1, src, np.zeros_like(ids), ids, np.zeros_like(ids))
    keep = np.ones(n0 + n1, dtype=bool)
    keep[5] = False  # a duplicate is never chosen
    is_val = validation_split(u, n_chars, src, keep, 0.02)
    assert not is_val[5]
    for si in (0, 1):
        m = keep & (src == si)
        share = n_chars[is_val & m].sum() / n_chars[m].sum()
        assert 0.015 <= share <= 0.02, (si, share)
    # Deterministic, and a pure function of the hash order.
    assert (validation_split(u, n_chars, src, keep, 0.02) == is_val).all()
    assert not validation_split(u, n_chars, src, keep, 0.0).any()


def test_validation_split_skips_documents_larger_than_the_share():
    # One 1 MB document and a few small ones: 2% must not take the big one whole.
    n_chars = np.array([1_000_000, 300, 300, 300, 300], dtype=np.int64)
    src = np.zeros(5, np.int64)
    u = np.array([0.0, 0.1, 0.2, 0.3, 0.4])  # the big document comes first in hash order
    is_val = validation_split(u, n_chars, src, np.ones(5, bool), 0.02)
    assert not is_val[0] and is_val[1:].all()


def test_test_split_is_disjoint_and_holds_its_share_of_each_source():
    from r1ray.data.config import PrepareDataConfig
    from r1ray.data.pipeline import _Docs, _held_out_splits
    from r1ray.data.shards import SPLITS

    n = 6000
    ids = np.arange(n, dtype=np.int64)
    src = (ids % 3 == 0).astype(np.int64)
    n_chars = np.where(src == 0, 100, 900).astype(np.int64)
    docs = _Docs(source=src, file=np.zeros(n, np.int64), pos=ids, part=np.zeros(n, np.int64), n_chars=n_chars)
    keep = ids % 50 != 7
    cfg = PrepareDataConfig(pack={"validation_fraction": 0.05, "test_fraction": 0.1})
    split = _held_out_splits(cfg, docs, keep)
    assert set(np.unique(split).tolist()) == {0, 1, 2} and SPLITS[2] == "test"
    assert (split[~keep] == 0).all()  # removed documents are never held out (and never packed)
    for si in (0, 1):
        m = keep & (src == si)
        total = n_chars[m].sum()
        assert n_chars[m & (split == 1)].sum() / total == pytest.approx(0.05, abs=0.005)
        assert n_chars[m & (split == 2)].sum() / total == pytest.approx(0.1, abs=0.005)
    # No test split by default: validation is exactly what it was before the test split existed.
    plain = _held_out_splits(PrepareDataConfig(pack={"validation_fraction": 0.05}), docs, keep)
    assert not (plain == 2).any() and ((plain == 1) == (split == 1)).all()
    with pytest.raises(ValueError, match="validation_fraction \\+ pack.test_fraction must be < 1"):
        PrepareDataConfig(pack={"validation_fraction": 0.5, "test_fraction": 0.5})
