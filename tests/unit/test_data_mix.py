"""Mixing rates and multiplicities, the per-document hash, and eval n-gram decontamination."""

from __future__ import annotations

import json

import numpy as np
import pytest

from r1ray.data.decontam import contaminated, eval_ngrams
from r1ray.data.dedup import word_hashes
from r1ray.data.mix import doc_uniform, mixing_rates, multiplicities


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
