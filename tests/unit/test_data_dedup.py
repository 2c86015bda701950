"""Exact hashes, MinHash signatures (checked against datasketch) and LSH clustering precision/recall."""

from __future__ import annotations

import numpy as np
import pytest

from r1ray.data import dedup as D
from r1ray.data.synthetic import labelled_near_duplicates, score, shingle_set


def _sigs(texts, num_perm=128, seed=1, n=5):
    a, b = D.permutations(num_perm, seed)
    sh = [np.unique(D.ngram_hashes(D.word_hashes(t), n)) for t in texts]
    return D.signatures(sh, a, b), np.array([len(s) > 0 for s in sh])


def test_exact_hash_ignores_case_whitespace_and_compatibility_forms():
    assert D.exact_hash("Hello   World\n") == D.exact_hash("hello world")
    assert D.exact_hash("ﬁne") == D.exact_hash("fine")  # NFKC ligature
    assert D.exact_hash("hello world") != D.exact_hash("hello worlds")
    hashes = np.array([D.exact_hash(t) for t in ["a b", "c", "A  B", "c", "d"]])
    assert D.exact_duplicates(hashes).tolist() == [False, False, True, True, False]


def test_batched_signatures_equal_one_at_a_time():
    texts = [f"doc {i} " + "word " * i + "end of the document here" for i in range(1, 60)] + ["", "x"]
    sig, _ = _sigs(texts)
    a, b = D.permutations(128, 1)
    for i, t in enumerate(texts):
        assert np.array_equal(sig[i], D.doc_signature(t, 5, a, b))
    assert (sig[-2] == 0xFFFFFFFF).all()  # no shingles: no signature


def test_minhash_estimates_jaccard_as_well_as_datasketch():
    datasketch = pytest.importorskip("datasketch")
    lab = labelled_near_duplicates(60, seed=3, copies=(1, 2))
    idx = np.flatnonzero(lab.true_jaccard > 0)
    sig, _ = _sigs(lab.texts)
    base = {}
    ours_err, ref_err = [], []
    for i in idx:
        # The earliest document with the highest true Jaccard is the copy's base or an earlier sibling.
        si = shingle_set(lab.texts[i], 5)
        j = max((k for k in range(i) if lab.texts[k] and shingle_set(lab.texts[k], 5) & si),
                key=lambda k: D.jaccard(shingle_set(lab.texts[k], 5), si))
        truth = D.jaccard(shingle_set(lab.texts[j], 5), si)
        ours_err.append(abs((sig[i] == sig[j]).mean() - truth))
        for k in (i, j):
            if k not in base:
                m = datasketch.MinHash(num_perm=128, seed=1)
                for g in shingle_set(lab.texts[k], 5):
                    m.update(" ".join(g).encode())
                base[k] = m
        ref_err.append(abs(base[i].jaccard(base[j]) - truth))
    # 128 permutations: standard error ~ sqrt(J(1-J)/128) <= 0.045.
    assert np.mean(ours_err) < 0.04 and np.mean(ref_err) < 0.04
    assert np.mean(ours_err) < np.mean(ref_err) + 0.01


def test_near_dedup_precision_recall_on_labelled_set():
    lab = labelled_near_duplicates(300, seed=0)
    sig, has = _sigs(lab.texts)
    keys = D.band_keys(sig, 16, 8, has)
    dropped, candidates = D.near_duplicates(keys, sig, 0.8)
    s = score(dropped, lab.is_duplicate)
    print("near-dedup on labelled set:", s, "candidates", candidates)
    assert s["precision"] >= 0.9 and s["recall"] >= 0.9
    # Originals come first and are never near each other: none of them may be dropped.
    assert not dropped[:300].any()


def test_cluster_keeps_the_earliest_document_deterministically():
    base = " ".join(f"w{i}" for i in range(200))
    texts = ["unrelated " * 50, base, base.replace("w10 ", "x10 "), base.replace("w50 ", "x50 ")]
    sig, has = _sigs(texts)
    keys = D.band_keys(sig, 16, 8, has)
    dropped, _ = D.near_duplicates(keys, sig, 0.8)
    assert dropped.tolist() == [False, False, True, True]
    # Reversing the corpus order keeps the (new) first one of the cluster.
    dropped_rev, _ = D.near_duplicates(keys[::-1].copy(), sig[::-1].copy(), 0.8)
    assert dropped_rev.tolist() == [False, True, True, False]


def test_band_keys_need_matching_rows():
    sig = np.tile(np.arange(16, dtype=np.uint32), (2, 1))
    sig[1, 8:] = 999
    keys = D.band_keys(sig, 2, 8, np.array([True, True]))
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] != keys[1, 1]
    assert (D.band_keys(sig, 2, 8, np.array([True, False]))[1] == 0).all()
