"""Data-stage benchmark: end-to-end throughput vs the tokenizer alone, and near-dedup quality vs peers.

    python benchmarks/data_pipeline.py                          # real text: this Python's stdlib (~30 MB) + copies
    python benchmarks/data_pipeline.py --mb 8                   # a smaller slice of it
    python benchmarks/data_pipeline.py --corpus synthetic       # labelled Zipfian documents (--base originals)

Corpora: ``stdlib`` is every ``.py`` file of this Python's standard library (tests included, site-packages
not) up to ``--mb``, with 10 % of the files copied once at a random later position, a share of their tokens
(0-5 %) replaced (``r1ray.data.synthetic.inject_near_duplicates``); ``synthetic`` is random Zipfian
documents with edited copies. Truth: a copy whose true word-5-gram Jaccard with its original is >= the
threshold, plus every pair the corpus already holds at >= the threshold (found by 64 x 2 banding and checked
on the true Jaccard: genuine near-twins are duplicates too, not false positives).

Prints, measured in this run on this machine:
- near-dedup precision/recall and time for r1ray's MinHash at several band x row layouts, accepting
  candidates on the estimate or on the verified true Jaccard (the trade-off in docs/data.md), datasketch's
  MinHashLSH (the reference) and, when installed (``pip install r1ray[bench]``), datatrove's 4-step MinHash
  pipeline, all at 5-gram shingles, Jaccard 0.8, 128 permutations (datatrove: 14 x 8 = 112, its default);
- r1ray's stage end to end on Ray Data (read → clean → PII → dedup → tokenizer training → tokenize →
  pack → write): MB/s, documents/s and tokens/s, side by side with the trained tokenizer alone
  (``encode_batch_fast`` over the same texts, all cores: the ceiling of this stage) and datatrove's MinHash.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from r1ray.data import dedup as D
from r1ray.data.synthetic import Labelled, inject_near_duplicates, labelled_near_duplicates, score

LAYOUTS = ((16, 8), (32, 4), (64, 2), (8, 16))  # bands x rows = 128 permutations


def stdlib_corpus(max_mb: float, seed: int = 0) -> Labelled:
    """Every .py file of this Python's standard library, sorted, up to ``max_mb``, with injected copies."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "__pycache__" in f.parts:
            continue
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if t.strip():
            texts.append(t)
            total += len(t)
        if total >= max_mb * 1e6:
            break
    # Code: a replaced token breaks several \w words, so the copies' edit rates are lower than for prose.
    return inject_near_duplicates(texts, seed=seed, edit_rates=(0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05))


def write_corpus(texts: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    return path


class R1rayMinHash:
    """Shingles and signatures once; then matching at any band layout, with or without verification."""

    def __init__(self, texts: list[str]):
        t0 = time.perf_counter()
        a, b = D.permutations(128, 1)
        self.sh = [D.shingles(t, 5) for t in texts]
        self.sig = D.signatures(self.sh, a, b)
        self.has = np.array([len(s) > 0 for s in self.sh])
        self.sets = dict(enumerate(self.sh))
        self.seconds = time.perf_counter() - t0

    def match(self, bands: int, rows: int, threshold: float, verify: bool) -> tuple[D.NearDuplicates, float]:
        t0 = time.perf_counter()
        keys = D.band_keys(self.sig, bands, rows, self.has)
        r = D.near_duplicates(keys, self.sig, threshold,
                              verify=(lambda x, y: D.pair_jaccard(self.sets, x, y)) if verify else None)
        return r, time.perf_counter() - t0


def bench_datasketch(texts, threshold):
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    dropped = np.zeros(len(texts), dtype=bool)
    for i, t in enumerate(texts):
        w = D.words(t)
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([" ".join(w[j : j + 5]).encode() for j in range(max(1, len(w) - 4))])
        if lsh.query(m):
            dropped[i] = True
        else:
            lsh.insert(str(i), m)
    return dropped, time.perf_counter() - t0


def _regex_word_tokenizer():
    """datatrove's English word tokenizer needs nltk and its punkt data (a download); use the same ``\\w+``
    words as r1ray instead, which also makes the shingles of both implementations identical."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return D.words(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return text.split("\n")

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(m.start(), m.end()) for m in D._WORD_RE.finditer(text)]

    return RegexWords("en")


def bench_datatrove(corpus_dir: Path, n: int, work: Path):
    import datatrove.utils.hashes.xxhash as dt_xxhash
    import xxhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    # datatrove 0.10's xxhash64 hashes `str`, which xxhash >= 4 refuses; encode first (the same hash).
    dt_xxhash.xxhash64 = lambda d: xxhash.xxh64_intdigest(d.encode() if isinstance(d, str) else d)
    dt_xxhash.xxhash32 = lambda d: xxhash.xxh32_intdigest(d.encode() if isinstance(d, str) else d)
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    t0 = time.perf_counter()
    steps = [
        [JsonlReader(str(corpus_dir)), MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg,
                                                                   language=_regex_word_tokenizer())],
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=cfg)],
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=cfg)],
        [JsonlReader(str(corpus_dir)), MinhashDedupFilter(input_folder=str(work / "remove"),
                                                          exclusion_writer=JsonlWriter(str(work / "removed")))],
    ]
    for i, pipe in enumerate(steps):
        tasks = cfg.num_buckets if i == 1 else 1
        LocalPipelineExecutor(pipeline=pipe, tasks=tasks, workers=min(tasks, os.cpu_count() or 1),
                              logging_dir=str(work / f"logs{i}"), skip_completed=False).run()
    elapsed = time.perf_counter() - t0
    dropped = np.zeros(n, dtype=bool)
    import gzip

    for f in (work / "removed").rglob("*.jsonl*"):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            for line in fh:
                dropped[int(json.loads(line)["id"])] = True
    return dropped, elapsed


def _stage_config(corpus_dir: Path, out: Path, name: str) -> dict:
    return {
        "run_name": name, "storage": {"root": str(out)},
        "sources": [{"name": "labelled", "path": str(corpus_dir), "quality_filters": False,
                     "collapse_whitespace": False, "id_field": "id"}],
        "tokenizer": {"vocab_size": 8192, "sample_chars": 2_000_000},
    }


def bench_process(corpus_dir: Path, out: Path) -> float:
    """Seconds of ``python jobs/prepare_data.py --config ...`` as a user runs it: interpreter start, imports,
    the embedded Ray's start (dashboard included) and shutdown, and the stage on cold workers."""
    import subprocess
    import sys

    cfg = out / "process.yaml"
    out.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps(_stage_config(corpus_dir, out, "process")))  # JSON is YAML
    job = Path(__file__).resolve().parent.parent / "jobs" / "prepare_data.py"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(job), "--config", str(cfg)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_pipeline(corpus_dir: Path, out: Path, texts: list[str]):
    from r1ray.data.config import PrepareDataConfig
    from r1ray.data.pipeline import run

    cfg = PrepareDataConfig.model_validate({**_stage_config(corpus_dir, out, "bench"),
                                            "ray": {"include_dashboard": False}})
    import ray

    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, logging_level="WARNING")
    try:
        run(cfg)  # warm-up: worker processes start and import once, as in a long-running job
        t0 = time.perf_counter()
        uri = run(cfg)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    from r1ray.artifacts import read_manifest

    m = read_manifest(uri)
    tokens = m["counts"]["train_tokens"] + m["counts"]["validation_tokens"] + m["counts"]["tail_tokens_dropped"]
    # The ceiling: the same trained tokenizer alone over the same texts, all cores, on the fast path (no
    # offsets) that the stage's tokenize tasks use too.
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tok = Tokenizer.from_file(str(Path(uri) / "tokenizer" / "tokenizer.json"))
    t0 = time.perf_counter()
    n_tok = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    tok_s = time.perf_counter() - t0
    return m, wall, tokens, tok_s, n_tok


def baselines(uri: str) -> None:
    """Validation cross-entropy of count models fitted on the train split: what a trained LM must beat."""
    import pyarrow.parquet as pq

    from r1ray.data.shards import DataArtifact

    art = DataArtifact.load(uri)

    def load(split: str) -> np.ndarray:
        return np.concatenate([pq.read_table(u)["input_ids"].combine_chunks().flatten().to_numpy()
                               for u in art.shard_uris(split)]).astype(np.int64)

    tr, va = load("train"), load("validation")
    vocab = int(max(tr.max(), va.max())) + 1
    uni = np.bincount(tr, minlength=vocab) + 1.0
    uni /= uni.sum()
    pair = tr[:-1] * vocab + tr[1:]
    keys, counts = np.unique(pair, return_counts=True)
    ctx = np.bincount(tr[:-1], minlength=vocab).astype(np.float64)
    q = va[:-1] * vocab + va[1:]
    pos = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
    c = np.where(keys[pos] == q, counts[pos], 0)
    alpha = 0.1 * vocab  # add-alpha smoothing towards the unigram
    p_bi = (c + alpha * uni[va[1:]]) / (ctx[va[:-1]] + alpha)
    print(f"{uri}: {len(tr)} train / {len(va)} validation tokens, vocab {vocab}")
    print(f"  validation cross-entropy (nats/token): unigram {-np.log(uni[va]).mean():.3f}, "
          f"smoothed bigram {-np.log(p_bi).mean():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=("stdlib", "synthetic"), default="stdlib")
    ap.add_argument("--mb", type=float, default=30.0, help="stdlib corpus: MB of source files before the copies")
    ap.add_argument("--base", type=int, default=2000, help="synthetic corpus: originals (each gets 0-3 copies)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--skip-pipeline", action="store_true", help="only the near-dedup comparison")
    ap.add_argument("--skip-dedup", action="store_true", help="only the end-to-end pipeline")
    ap.add_argument("--baselines", metavar="DATA_URI", help="only print unigram/bigram baselines of an artifact")
    args = ap.parse_args()
    if args.baselines:
        baselines(args.baselines)
        return

    work = Path(tempfile.mkdtemp(prefix="r1ray-bench-"))
    try:
        if args.corpus == "stdlib":
            lab = stdlib_corpus(args.mb)
        else:
            lab = labelled_near_duplicates(args.base, seed=0, threshold=args.threshold)
        texts = lab.texts
        mb = sum(len(t.encode()) for t in texts) / 1e6
        corpus_dir = work / "corpus"
        write_corpus(texts, corpus_dir)
        print(f"corpus {args.corpus}: {len(texts)} documents, {mb:.1f} MB, {int((lab.true_jaccard > 0).sum())} "
              f"injected copies of which {int(lab.is_duplicate.sum())} at 5-gram Jaccard >= {args.threshold}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
        dt_seconds = truth = None
        if not args.skip_dedup:
            dt_seconds, truth = dedup_report(texts, lab, corpus_dir, work, args.threshold)
        if not args.skip_pipeline:
            pipeline_report(corpus_dir, work, texts, lab, mb, dt_seconds, truth)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dedup_report(texts, lab, corpus_dir: Path, work: Path, threshold: float) -> tuple[float | None, np.ndarray]:
    """Prints the comparison; returns datatrove's seconds (None when it is not installed) and the truth."""
    mh = R1rayMinHash(texts)
    ref, _ = mh.match(64, 2, threshold, verify=True)
    truth = lab.is_duplicate | ref.dropped  # ref's drops are verified pairs: genuine near-twins count as duplicates
    print(f"truth: {int(truth.sum())} duplicates ({int((ref.dropped & (lab.true_jaccard == 0)).sum())} genuine "
          f"near-twins among the originals); r1ray shingles + signatures: {mh.seconds:.1f}s (1 process)")
    print(f"\nnear-dedup at Jaccard {threshold}:")
    print(f"  {'implementation':44s} {'seconds':>8s} {'precision':>9s} {'recall':>7s} {'copies':>7s} "
          f"{'candidates':>10s} {'verified':>8s}")
    copies = lab.is_duplicate

    def row(name, dropped, s, cand="", ver=""):
        sc, rc = score(dropped, truth), score(dropped[copies], copies[copies])
        print(f"  {name:44s} {s:8.2f} {sc['precision']:9.3f} {sc['recall']:7.3f} {rc['recall']:7.3f} "
              f"{cand!s:>10s} {ver!s:>8s}")

    for bands, rows in LAYOUTS:
        for verify in (False, True):
            r, s = mh.match(bands, rows, threshold, verify)
            row(f"r1ray {bands}x{rows} {'verified' if verify else 'estimated'} (match only)", r.dropped, s,
                r.candidates, r.verified_pairs if verify else "")
    try:
        dropped, s = bench_datasketch(texts, threshold)
        row("datasketch MinHashLSH (1 process, all steps)", dropped, s)
    except ImportError:
        print("datasketch not installed: skipping the reference (pip install datasketch)")
    try:
        import datatrove  # noqa: F401
    except ImportError:
        print("datatrove not installed: skipping it (pip install 'r1ray[bench]')")
        return None, truth
    dropped, s = bench_datatrove(corpus_dir, len(texts), work / "datatrove")
    row(f"datatrove MinHash 4 steps ({os.cpu_count()} workers)", dropped, s)
    print("  (copies: recall over the injected copies alone; r1ray's rows time the matching only, after its "
          f"{mh.seconds:.1f}s of signatures)")
    return s, truth


def pipeline_report(corpus_dir: Path, work: Path, texts, lab, mb: float, dt_seconds: float | None,
                    truth: np.ndarray | None) -> None:
    process_s = bench_process(corpus_dir, work / "process")  # first: no Ray of this process is still exiting
    m, wall, tokens, tok_s, n_tok = bench_pipeline(corpus_dir, work / "out", texts)
    stage = m["timings_s"]
    print("\nr1ray data stage end to end on Ray Data (second run, warm workers):")
    print(f"  wall {wall:.1f}s (stage {stage['total_s']:.1f}s: read+clean+minhash {stage['clean_s']:.1f}, dedup "
          f"{stage['dedup_s']:.2f}, tokenizer training {stage['tokenizer_s']:.1f}, tokenize+pack {stage['pack_s']:.1f})")
    print(f"  stage {mb / wall:.2f} MB/s, {len(texts) / wall:.0f} documents/s, {tokens / wall:.0f} tokens/s")
    print(f"  tokenizer alone (encode_batch_fast, all cores): {tok_s:.2f}s = {mb / tok_s:.2f} MB/s, {n_tok / tok_s:.0f} "
          f"tokens/s; stage / tokenizer-alone throughput: {(tokens / wall) / (n_tok / tok_s):.3f}")
    if dt_seconds:
        print(f"  datatrove MinHash alone (4 steps, no tokenizing): {dt_seconds:.1f}s = {mb / dt_seconds:.2f} MB/s; "
              f"stage / datatrove: {dt_seconds / wall:.2f}")
    print(f"  whole process (python jobs/prepare_data.py --config ..., Ray start-up and cold workers included): "
          f"{process_s:.1f}s = {mb / process_s:.2f} MB/s")
    print(f"  dedup in the stage: {m['counts']['duplicate_exact']} exact + {m['counts']['duplicate_near']} near "
          f"removed (injected copies at Jaccard >= threshold: {int(lab.is_duplicate.sum())}; exact copies count "
          "as exact)")
    if truth is not None:
        removed = stage_removed(work / "out" / "data" / "bench", len(texts))
        sc, rc = score(removed, truth), score(removed[lab.is_duplicate], lab.is_duplicate[lab.is_duplicate])
        print(f"  the stage's removals (its duplicates/ dataset) against the truth above: precision "
              f"{sc['precision']:.3f}, recall {sc['recall']:.3f} (injected copies: recall {rc['recall']:.3f})")


def stage_removed(uri: Path, n: int) -> np.ndarray:
    """Which documents the stage removed as exact or near duplicates, by the corpus id in its audit trail."""
    import pyarrow.parquet as pq

    from r1ray.artifacts import read_manifest

    m = read_manifest(str(uri))
    removed = np.zeros(n, dtype=bool)
    for f in m["duplicates"]["files"]:
        removed[[int(i) for i in pq.read_table(uri / f["path"], columns=["id"])["id"].to_pylist()]] = True
    return removed


if __name__ == "__main__":
    main()
