"""Exact hashes, MinHash signatures (checked against datasketch) and LSH clustering precision/recall."""

from __future__ import annotations

from collections import Counter

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


def _verifier(texts):
    sets = {i: D.shingles(t, 5) for i, t in enumerate(texts)}
    return lambda a, b: D.pair_jaccard(sets, a, b)


def test_near_dedup_precision_recall_on_labelled_set():
    lab = labelled_near_duplicates(300, seed=0)
    sig, has = _sigs(lab.texts)
    keys = D.band_keys(sig, 16, 8, has)
    est = D.near_duplicates(keys, sig, 0.8)
    s_est = score(est.dropped, lab.is_duplicate)
    ver = D.near_duplicates(keys, sig, 0.8, verify=_verifier(lab.texts))
    s = score(ver.dropped, lab.is_duplicate)
    print("near-dedup on labelled set: estimated", s_est, "verified", s, "candidates", ver.candidates,
          "verified pairs", ver.verified_pairs)
    assert s_est["precision"] >= 0.9 and s_est["recall"] >= 0.9
    # Verification removes the estimator's noise at the threshold: no false positive, at least as much recall.
    assert s["precision"] == 1.0 and s["recall"] >= max(0.97, s_est["recall"])
    assert 0 < ver.verified_pairs <= ver.candidates
    # Originals come first and are never near each other: none of them may be dropped.
    assert not ver.dropped[:300].any()
    # Every dropped document's match is earlier, and its recorded similarity is the true one.
    d = np.flatnonzero(ver.dropped)
    assert (ver.match[d] < d).all() and (ver.match[~ver.dropped] == -1).all()
    for i in d[:50]:
        truth = D.jaccard(shingle_set(lab.texts[i], 5), shingle_set(lab.texts[ver.match[i]], 5))
        assert ver.verified[i] == pytest.approx(truth, abs=1e-6) and truth >= 0.8
        assert abs(ver.estimated[i] - truth) < 0.2


def test_candidate_pairs_are_distinct_later_earlier_pairs():
    keys = np.array([[5, 1], [5, 2], [5, 1], [0, 0], [7, 2]], dtype=np.int64)
    later, earlier = D.candidate_pairs(keys)
    # band 0 bucket 5: (1,0), (2,0), (2,1) via the predecessor; band 1: (2,0) again, (4,1); key 0 ignored
    assert sorted(zip(later.tolist(), earlier.tolist(), strict=True)) == [(1, 0), (2, 0), (2, 1), (4, 1)]


def test_a_chain_of_copies_matches_the_previous_copy():
    base = [f"w{i}" for i in range(600)]
    c1 = base[:]
    for i in range(0, 600, 75):
        c1[i] = "x" + c1[i]
    c2 = c1[:]
    for i in range(37, 600, 75):
        c2[i] = "y" + c2[i]
    texts = [" ".join(t) for t in (base, c1, c2)]
    sig, has = _sigs(texts)
    sets = {i: D.shingles(t, 5) for i, t in enumerate(texts)}
    j = D.pair_jaccard(sets, np.array([1, 2, 2]), np.array([0, 1, 0]))
    assert j[0] >= 0.8 and j[1] >= 0.8 and j[2] < 0.8  # c2 is near c1 but not near the base
    r = D.near_duplicates(D.band_keys(sig, 32, 4, has), sig, 0.8, verify=_verifier(texts))
    assert r.dropped.tolist() == [False, True, True] and r.match.tolist() == [-1, 0, 1]


def test_cluster_keeps_the_earliest_document_deterministically():
    base = " ".join(f"w{i}" for i in range(200))
    texts = ["unrelated " * 50, base, base.replace("w10 ", "x10 "), base.replace("w50 ", "x50 ")]
    sig, has = _sigs(texts)
    keys = D.band_keys(sig, 16, 8, has)
    r = D.near_duplicates(keys, sig, 0.8, verify=_verifier(texts))
    assert r.dropped.tolist() == [False, False, True, True] and r.match.tolist() == [-1, -1, 1, 1]
    # Reversing the corpus order keeps the (new) first one of the cluster.
    rev = D.near_duplicates(keys[::-1].copy(), sig[::-1].copy(), 0.8, verify=_verifier(texts[::-1]))
    assert rev.dropped.tolist() == [False, True, True, False] and rev.match.tolist() == [-1, 0, 0, -1]


def test_band_keys_need_matching_rows():
    sig = np.tile(np.arange(16, dtype=np.uint32), (2, 1))
    sig[1, 8:] = 999
    keys = D.band_keys(sig, 2, 8, np.array([True, True]))
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] != keys[1, 1]
    assert (D.band_keys(sig, 2, 8, np.array([True, False]))[1] == 0).all()


def test_injected_copies_come_after_their_originals_with_true_labels():
    from r1ray.data.synthetic import inject_near_duplicates

    texts = [" ".join(f"t{i}w{k}" for k in range(200)) + "\n    indented line" for i in range(40)]
    lab = inject_near_duplicates(texts, seed=1, copy_fraction=0.5, edit_rates=(0.0, 0.01, 0.2))
    assert len(lab.texts) == 60 and lab.texts[: 1] == texts[:1]
    copies = np.flatnonzero(lab.true_jaccard > 0)
    assert len(copies) == 20
    for i in copies:
        # The original is the document whose words the copy mostly holds, and it comes earlier.
        tag = Counter(w.split("w")[0] for w in lab.texts[i].split() if w.startswith("t")).most_common(1)[0][0]
        orig = next(k for k, t in enumerate(lab.texts) if t.startswith(f"{tag}w0 ") and k != i)
        assert orig < i
        truth = D.jaccard(shingle_set(lab.texts[orig], 5), shingle_set(lab.texts[i], 5))
        assert lab.true_jaccard[i] == pytest.approx(truth) and lab.is_duplicate[i] == (truth >= 0.8)
    assert lab.is_duplicate.sum() > 0 and (~lab.is_duplicate[copies]).sum() > 0  # both sides of the threshold


def test_kept_document_is_the_end_of_the_chain_of_matches():
    from r1ray.data.duplicates import Dedup

    nan = float("nan")
    d = Dedup(exact=np.array([False, False, True, False, False]), near=np.array([False, True, False, True, False]),
              match=np.array([-1, 0, 1, 2, -1]), estimated=np.array([nan, 0.9, 1.0, 0.85, nan], dtype=np.float32),
              verified=np.array([nan, 0.9, 1.0, 0.86, nan], dtype=np.float32))
    # 1 matched 0; 2 is an exact copy of 1 (removed); 3 matched 2: all of them are kept as 0.
    assert d.kept_of().tolist() == [0, 0, 0, 0, 4]
    assert d.removed.tolist() == [False, True, True, True, False]
