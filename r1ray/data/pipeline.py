"""The data stage on Ray Data: read → clean → PII → decontaminate → dedup → tokenize → mix → pack.

Two streaming passes, each a Ray Data dataset of task-based ``map_batches`` (no actor pools: on 2 CPUs an
actor pool holding every CPU starves the reader) consumed in order on the driver:

1. *clean*: one task per input file (or generated-sample range) reads it, turns bad rows into rejects,
   normalises, splits gigantic documents, filters, scrubs PII, checks eval n-grams and computes the exact
   hash and MinHash signature. The driver streams the results into staged Parquet (``_work/clean``), the
   rejects into ``rejects/``, and keeps only the small per-document keys in memory.
2. The driver finds exact and near duplicates from the keys, chooses the split and the mixing
   multiplicities, and trains (or loads) the tokenizer on a sample of the kept documents.
3. *tokenize*: one task per staged file (and mixing pass) tokenizes the kept documents with a
   module-level cached tokenizer; the driver packs them in corpus order into ``seq_len`` rows and
   writes the shards. The manifest is written last, atomically.

Ray Data's ``preserve_order`` makes the driver see results in corpus order whatever the scheduling, so
the same input and seed give byte-identical shards. Memory stays bounded: Ray Data back-pressures
the tasks against the object store, and the driver holds one batch plus the keys (~0.6 KB a document).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from r1ray.artifacts import (
    MANIFEST,
    filesystem,
    is_complete,
    join,
    now,
    read_manifest,
    write_bytes_atomic,
    write_manifest,
)
from r1ray.config import RayConfig, StorageConfig
from r1ray.data.clean import PII_KINDS
from r1ray.data.config import PrepareDataConfig, SourceConfig
from r1ray.observe.log import get_logger
from r1ray.observe.metrics import record

log = get_logger(__name__)

STATUS_OK, STATUS_REJECTED, STATUS_FILTERED, STATUS_FILE = "ok", "rejected", "filtered", "file"
# A staged file holds at most this many documents or bytes of text: the unit of tokenizing work, and a
# bound on what the driver buffers.
_STAGE_ROWS, _STAGE_BYTES = 4096, 8 << 20

_DUPLICATES_ROWS = 100_000


def _doc_fields(prefix: str) -> list[tuple[str, pa.DataType]]:
    return [(f"{prefix}source", pa.string()), (f"{prefix}path", pa.string()), (f"{prefix}position", pa.int64()),
            (f"{prefix}part", pa.int32()), (f"{prefix}id", pa.string())]


# The duplicates/ audit dataset: a removed document, its kind, its similarity to the document it matched
# (an earlier one, verified on the true shingle Jaccard), and the kept document at the end of the chain
# of matches (the matched one itself unless that was removed too).
DUPLICATES_SCHEMA = pa.schema([
    *_doc_fields(""), ("kind", pa.string()), ("similarity_estimated", pa.float32()),
    ("similarity_verified", pa.float32()), *_doc_fields("matched_"), *_doc_fields("kept_"),
])

CLEAN_SCHEMA = pa.schema([
    ("source", pa.int32()), ("file", pa.int32()), ("pos", pa.int64()), ("part", pa.int32()),
    ("status", pa.string()), ("reason", pa.string()), ("text", pa.large_string()), ("doc_id", pa.string()),
    ("exact", pa.int64()), ("bands", pa.list_(pa.int64())), ("sig", pa.list_(pa.uint32())),
    ("n_chars", pa.int64()), ("edits", pa.int32()),
    *((f"pii_{k}", pa.int32()) for k in PII_KINDS),
])


# ---------------------------------------------------------------------------------------------------
# Pass 1: read and clean (runs in Ray tasks)
# ---------------------------------------------------------------------------------------------------

_CACHE: dict[str, Any] = {}


def _cached_get(ref: Any) -> Any:
    """``ray.get`` once per worker process (the eval n-gram set, the tokenizer)."""
    import ray

    key = ref.hex()
    if key not in _CACHE:
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


class _CleanBatch:
    """Rows of CLEAN_SCHEMA being gathered for one output table; signatures are computed per flush."""

    def __init__(self, task: Any, a: np.ndarray, b: np.ndarray, dd: Any):
        self.task, self.a, self.b, self.dd = task, a, b, dd
        self.rows: dict[str, list] = {f.name: [] for f in CLEAN_SCHEMA if f.name not in ("bands", "sig")}
        self.shingles: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.shingles)

    def add(self, pos: int, part: int, status: str, reason: str = "", text: str | None = None, *,
            exact: int = 0, n_chars: int = 0, edits: int = 0, pii: dict | None = None,
            sh: np.ndarray | None = None, doc_id: str | None = None) -> None:
        r = self.rows
        for k, v in (("source", self.task.source), ("file", self.task.file), ("pos", pos), ("part", part),
                     ("status", status), ("reason", reason), ("text", text), ("doc_id", doc_id), ("exact", exact),
                     ("n_chars", n_chars), ("edits", edits)):
            r[k].append(v)
        for k in PII_KINDS:
            r[f"pii_{k}"].append((pii or {}).get(k, 0))
        self.shingles.append(sh if sh is not None else np.zeros(0, dtype=np.uint64))

    def flush(self) -> pa.Table:
        from r1ray.data import dedup as D

        dd, n = self.dd, len(self.shingles)
        if dd.near:
            sigs = D.signatures(self.shingles, self.a, self.b)
            has = np.array([len(x) > 0 for x in self.shingles], dtype=bool)
            keys = D.band_keys(sigs, dd.bands, dd.rows, has)
        else:
            sigs, keys = np.zeros((n, 0), dtype=np.uint32), np.zeros((n, 0), dtype=np.int64)
        cols: dict[str, Any] = dict(self.rows)
        cols["bands"] = _fixed_lists(keys, pa.int64())
        cols["sig"] = _fixed_lists(sigs, pa.uint32())
        table = pa.Table.from_pydict({f.name: cols[f.name] for f in CLEAN_SCHEMA}, schema=CLEAN_SCHEMA)
        for v in self.rows.values():
            v.clear()
        self.shingles = []
        return table


def _fixed_lists(m: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    """An (n x k) matrix as a list column of n lists of k values."""
    n, k = m.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(m.reshape(-1), type=typ))


def _clean_file(batch: dict, *, cfg_json: str, eval_ref: Any) -> Any:
    """Ray Data UDF: one FileTask in, a stream of CLEAN_SCHEMA tables out (generator)."""
    from r1ray.data import clean as C
    from r1ray.data import dedup as D
    from r1ray.data.decontam import contaminated
    from r1ray.data.sources import FileTask, ReadStats, read_records

    cfg = _CACHE.get(cfg_json) or _CACHE.setdefault(cfg_json, PrepareDataConfig.model_validate_json(cfg_json))
    eval_set = _cached_get(eval_ref)
    a, b = D.permutations(cfg.dedup.num_perm, cfg.dedup.seed)
    clean_cfg, dd = cfg.clean, cfg.dedup
    n_tasks = len(batch["source"])
    for t in range(n_tasks):
        task = FileTask(**{k: (v[t].item() if hasattr(v[t], "item") else v[t]) for k, v in batch.items()})
        src: SourceConfig = cfg.sources[task.source]
        stats = ReadStats()
        out = _CleanBatch(task, a, b, dd)
        add = out.add
        for rec in read_records(task, src, clean_cfg.max_line_bytes, cfg.seed, stats):
            if rec.reason is not None:
                add(rec.pos, 0, STATUS_REJECTED, rec.reason, rec.raw)
            else:
                text, edits = C.normalize(rec.text, unicode_form=clean_cfg.unicode_form,
                                          collapse_whitespace=src.collapse_whitespace)
                if not text:
                    add(rec.pos, 0, STATUS_REJECTED, "empty_document", rec.text[:200], edits=edits)
                    parts: list[str] = []
                elif len(text) > clean_cfg.max_chars:
                    if clean_cfg.oversize == "reject":
                        add(rec.pos, 0, STATUS_REJECTED, "oversize_document", text[:200], edits=edits)
                        parts = []
                    elif clean_cfg.oversize == "truncate":
                        parts, edits = [text[: clean_cfg.max_chars]], edits | C.EDIT_TRUNCATED
                    else:
                        parts = C.split_oversize(text, clean_cfg.max_chars)
                else:
                    parts = [text]
                for part_idx, piece in enumerate(parts):
                    # A split document's extra pieces are counted as documents of their own (part > 0).
                    if len(piece) < clean_cfg.min_chars:
                        add(rec.pos, part_idx, STATUS_FILTERED, "too_short", edits=edits)
                        continue
                    if src.quality_filters:
                        reason = C.quality_reason(piece, clean_cfg.quality)
                        if reason is not None:
                            add(rec.pos, part_idx, STATUS_FILTERED, reason, edits=edits)
                            continue
                    piece, pii = C.scrub_pii(piece, clean_cfg.pii)
                    wh = D.word_hashes(piece) if (dd.near or len(eval_set)) else None
                    if wh is not None and contaminated(wh, eval_set, cfg.decontam.ngram):
                        add(rec.pos, part_idx, STATUS_FILTERED, "decontaminated", edits=edits, pii=pii)
                        continue
                    sh = np.unique(D.ngram_hashes(wh, dd.shingle_size)) if dd.near else None
                    add(rec.pos, part_idx, STATUS_OK, "", piece, exact=D.exact_hash(piece), n_chars=len(piece),
                        edits=edits, pii=pii, sh=sh, doc_id=rec.doc_id)
            if len(out) >= cfg.batch_size:
                yield out.flush()
        # The file's own summary row: bytes read and their SHA-256 (the manifest's input hashes).
        add(-2, 0, STATUS_FILE, stats.sha.hexdigest(), task.path, n_chars=stats.bytes)
        yield out.flush()


# ---------------------------------------------------------------------------------------------------
# Pass 3: tokenize (runs in Ray tasks)
# ---------------------------------------------------------------------------------------------------


def _tokenize_file(batch: dict, *, tok_ref: Any, eos_id: int) -> Any:
    """Ray Data UDF: one (staged file, mixing pass) in, token ids of its selected documents out."""
    from tokenizers import Tokenizer

    key = "tok:" + tok_ref.hex()
    tok = _CACHE.get(key)
    if tok is None:
        tok = _CACHE[key] = Tokenizer.from_str(_cached_get(tok_ref))
    for t in range(len(batch["path"])):
        path, k = batch["path"][t], int(batch["pass_idx"][t])
        mult = np.frombuffer(batch["mult"][t], dtype=np.uint8)
        split = np.frombuffer(batch["split"][t], dtype=np.uint8)
        fs, p = filesystem(path)
        with fs.open_input_file(p) as f:
            table = pq.read_table(f, columns=["text", "source"])
        sel = np.flatnonzero(mult > k)
        if len(sel) == 0:
            continue
        texts = table.column("text").take(pa.array(sel)).to_pylist()
        sources = table.column("source").to_numpy()[sel]
        for lo in range(0, len(texts), 1024):
            encs = tok.encode_batch(texts[lo : lo + 1024], add_special_tokens=False)
            ids = [np.append(np.asarray(e.ids, dtype=np.int32), np.int32(eos_id)) for e in encs]
            lengths = np.array([len(x) for x in ids], dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            yield pa.table({
                "ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(ids))),
                "source": pa.array(sources[lo : lo + 1024], type=pa.int32()),
                "split": pa.array(split[sel[lo : lo + 1024]], type=pa.uint8()),
            })


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


class _Staging:
    """Rolling Parquet files of the kept documents' text, in corpus order."""

    def __init__(self, work: str):
        self.work = work
        self.files: list[tuple[str, int]] = []  # (uri, rows)
        self._tables: list[pa.Table] = []
        self._rows = self._bytes = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._tables.append(table)
            self._rows += table.num_rows
            self._bytes += table.nbytes
            if self._rows >= _STAGE_ROWS or self._bytes >= _STAGE_BYTES:
                self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        uri = join(self.work, f"clean/part-{len(self.files):05d}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(pa.concat_tables(self._tables), sink, compression="zstd")
        write_bytes_atomic(uri, sink.getvalue())  # a pa.Buffer: no extra copy
        self.files.append((uri, self._rows))
        self._tables, self._rows, self._bytes = [], 0, 0


class _Rejects:
    def __init__(self, artifact: str, names: list[str]):
        self.artifact, self.names = artifact, names
        self.files: list[dict] = []
        self._rows: dict[str, list] = defaultdict(list)

    def add(self, source: str, path: str, pos: int, part: int, reason: str, raw: str) -> None:
        r = self._rows
        r["source"].append(source)
        r["path"].append(path)
        r["position"].append(pos)
        r["part"].append(part)
        r["reason"].append(reason)
        r["raw"].append(raw)
        if len(r["source"]) >= 50_000:
            self.flush()

    def flush(self) -> None:
        if not self._rows.get("source"):
            return
        table = pa.table(dict(self._rows))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        rel = f"rejects/rejects-{len(self.files):05d}.parquet"
        write_bytes_atomic(join(self.artifact, rel), sink.getvalue())
        self.files.append({"path": rel, "rows": table.num_rows})
        self._rows = defaultdict(list)


def _num_blocks(tasks: list) -> int:
    """Blocks of read tasks: small files share a block (a Ray task each block), big files get their own."""
    total = sum(t.size for t in tasks) + sum(t.count for t in tasks) * 300
    return max(1, min(len(tasks), 8 + total // (8 << 20)))


def _prepare_output(uri: str, overwrite: bool) -> None:
    fs, p = filesystem(uri)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        fs.create_dir(p, recursive=True)
        return
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"output {uri} exists and is not a directory; set output to a directory")
    has_content = bool(fs.get_file_info(pafs.FileSelector(p)))
    if has_content and not overwrite:
        raise ValueError(f"output {uri} is not empty; set overwrite=true or choose another name/output")
    if is_complete(uri):
        fs.delete_file(f"{p}/{MANIFEST}")  # first: a reader never sees a manifest over half-written shards
    for sub in ("train", "validation", "rejects", "duplicates", "tokenizer", "_work"):
        if fs.get_file_info(f"{p}/{sub}").type == pafs.FileType.Directory:
            fs.delete_dir(f"{p}/{sub}")


def _copy_dir_to(local: Path, uri: str) -> None:
    for f in sorted(local.iterdir()):
        if f.is_file():
            write_bytes_atomic(join(uri, f.name), f.read_bytes())


def _sample_for_tokenizer(staging: _Staging, keep_ordinals: np.ndarray, u: np.ndarray, n_chars: np.ndarray,
                          budget: int, sources: np.ndarray) -> tuple[list[str], list[int]]:
    """Kept documents in the order of a per-document uniform number until ``budget`` characters."""
    order = keep_ordinals[np.argsort(u[keep_ordinals], kind="stable")]
    cum = np.cumsum(n_chars[order])
    chosen = np.sort(order[: max(1, int(np.searchsorted(cum, budget)) + 1)])
    return _read_staged(staging, chosen, "text"), sources[chosen].tolist()


def _read_staged(staging: _Staging, ordinals: np.ndarray, column: str) -> list:
    """One column's values of the staged documents at sorted ``ordinals`` (corpus order of kept candidates)."""
    out: list = []
    start = 0
    for uri, rows in staging.files:
        lo, hi = np.searchsorted(ordinals, [start, start + rows])
        if hi > lo:
            fs, p = filesystem(uri)
            with fs.open_input_file(p) as f:
                col = pq.read_table(f, columns=[column]).column(column)
            out.extend(col.take(pa.array(ordinals[lo:hi] - start)).to_pylist())
        start += rows
    return out


@dataclass
class _Dedup:
    """Which documents (ordinals of the staged documents) are duplicates, and of what."""

    exact: np.ndarray
    """bool: an exact duplicate of an earlier document."""
    near: np.ndarray
    """bool: a near-duplicate of an earlier document."""
    match: np.ndarray
    """int64: the earlier document each duplicate matched (-1 for the others)."""
    estimated: np.ndarray
    """float32: estimated Jaccard with ``match`` (1 for exact duplicates, NaN for the others)."""
    verified: np.ndarray
    """float32: true shingle Jaccard with ``match`` (1 for exact, NaN when not verified)."""
    candidates: int = 0
    verified_pairs: int = 0

    @property
    def removed(self) -> np.ndarray:
        return self.exact | self.near

    def kept_of(self) -> np.ndarray:
        """For each duplicate, the kept document at the end of its chain of matches (itself otherwise)."""
        kept = np.arange(len(self.match))
        for i in np.flatnonzero(self.removed).tolist():  # increasing: a match is always earlier, already resolved
            kept[i] = kept[self.match[i]]
        return kept


def _deduplicate(cfg: PrepareDataConfig, keys: dict[str, list], staging: _Staging) -> _Dedup:
    """Exact duplicates by content hash, then near-duplicates among the rest (MinHash LSH, verified)."""
    from r1ray.data import dedup as D

    dd = cfg.dedup
    n = len(keys["source"])
    first = D.first_occurrence(np.asarray(keys["exact"], dtype=np.int64)) if dd.exact else np.arange(n)
    exact = first != np.arange(n)
    res = _Dedup(exact=exact, near=np.zeros(n, dtype=bool), match=np.where(exact, first, -1),
                 estimated=np.where(exact, 1.0, np.nan).astype(np.float32),
                 verified=np.where(exact, 1.0, np.nan).astype(np.float32))
    if not dd.near:
        return res
    alive = np.flatnonzero(~exact)
    bands = np.concatenate(keys["bands"]).reshape(n, dd.bands)[alive]
    sigs = np.concatenate(keys["sig"]).reshape(n, dd.num_perm)[alive]

    def verify(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # Re-read and shingle only the documents of pairs near the threshold (the text is scrubbed and
        # staged exactly as the signature saw it).
        need = np.unique(np.concatenate([alive[a], alive[b]]))
        texts = _read_staged(staging, need, "text")
        sets = {int(o): D.shingles(t, dd.shingle_size) for o, t in zip(need, texts, strict=True)}
        return D.pair_jaccard(sets, alive[a], alive[b])

    near = D.near_duplicates(bands, sigs, dd.threshold, verify=verify if dd.verify else None)
    hit = alive[near.dropped]
    res.near[hit] = True
    res.match[hit] = alive[near.match[near.dropped]]
    res.estimated[hit] = near.estimated[near.dropped]
    res.verified[hit] = near.verified[near.dropped]
    res.candidates, res.verified_pairs = near.candidates, near.verified_pairs
    return res


def _write_duplicates(out: str, dups: _Dedup, staging: _Staging, coords: dict[str, np.ndarray],
                      names: list[str], paths: dict[tuple[int, int], str]) -> dict[str, Any]:
    """The ``duplicates/`` audit dataset: every removed document, what it matched and the document kept.

    Rows are in corpus order of the removed documents; ``coords`` holds each staged document's source,
    file, pos and part. Returns the manifest's ``duplicates`` entry.
    """
    removed = np.flatnonzero(dups.removed)
    match = dups.match[removed]
    kept = dups.kept_of()[removed]
    need = np.unique(np.concatenate([removed, match, kept]))
    ids = dict(zip(need.tolist(), _read_staged(staging, need, "doc_id"), strict=True))

    def described(prefix: str, idx: np.ndarray) -> dict[str, list]:
        s, f = coords["source"][idx], coords["file"][idx]
        return {
            f"{prefix}source": [names[i] for i in s.tolist()],
            f"{prefix}path": [paths[(a, b)] for a, b in zip(s.tolist(), f.tolist(), strict=True)],
            f"{prefix}position": coords["pos"][idx].tolist(),
            f"{prefix}part": coords["part"][idx].astype(np.int32).tolist(),
            f"{prefix}id": [ids[i] for i in idx.tolist()],
        }

    files = []
    for lo in range(0, max(len(removed), 1), _DUPLICATES_ROWS):
        sel = slice(lo, lo + _DUPLICATES_ROWS)
        table = pa.table({
            **described("", removed[sel]),
            "kind": ["exact" if e else "near" for e in dups.exact[removed[sel]].tolist()],
            "similarity_estimated": pa.array(dups.estimated[removed[sel]], type=pa.float32()),
            "similarity_verified": pa.array(dups.verified[removed[sel]], type=pa.float32(), from_pandas=True),
            **described("matched_", match[sel]),
            **described("kept_", kept[sel]),
        }, schema=DUPLICATES_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        rel = f"duplicates/duplicates-{len(files):05d}.parquet"
        write_bytes_atomic(join(out, rel), sink.getvalue())
        files.append({"path": rel, "rows": table.num_rows})
    return {"files": files, "rows": int(len(removed))}


def run(cfg: PrepareDataConfig) -> str:
    """Run the data stage; returns the artifact URI (a complete artifact: ``DataArtifact.load`` works)."""
    from r1ray.runtime import ray_session

    with ray_session(cfg.ray):
        return _run(cfg)


def _run(cfg: PrepareDataConfig) -> str:
    import ray
    from ray.data import DataContext

    from r1ray.data.decontam import eval_ngrams
    from r1ray.data.mix import doc_uniform, mixing_rates, multiplicities, validation_split
    from r1ray.data.pack import ShardWriter
    from r1ray.data.sources import plan
    from r1ray.model.tokenizer import REASONING_TOKENS, load_tokenizer, tokenizer_sha256, train_tokenizer

    t_start, started_at = time.perf_counter(), now()
    out = cfg.artifact_uri()
    names = [s.name for s in cfg.sources]
    tasks, problems = plan(cfg.sources)
    if problems:
        raise ValueError("cannot read the sources:\n  - " + "\n  - ".join(problems))
    _prepare_output(out, cfg.overwrite)
    work = join(out, "_work")
    log.info("data stage: %d sources, %d read tasks -> %s", len(names), len(tasks), out)

    ctx = DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # corpus order on the driver: deterministic shards
    try:
        eval_set = eval_ngrams(cfg.decontam.eval_files, cfg.decontam.eval_text_fields, cfg.decontam.ngram)
        if cfg.decontam.eval_files:
            log.info("decontamination: %d distinct %d-grams from %d eval files", len(eval_set),
                     cfg.decontam.ngram, len(cfg.decontam.eval_files))
        eval_ref = ray.put(eval_set)
        items = [t.__dict__ for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=_num_blocks(tasks)).map_batches(
            _clean_file, batch_size=1, batch_format="numpy", num_cpus=1,
            fn_kwargs={"cfg_json": cfg.model_dump_json(), "eval_ref": eval_ref},
        )

        # ---- pass 1: stream cleaned documents into staging, rejects into rejects/, keys into memory
        staging, rejects = _Staging(work), _Rejects(out, names)
        keys: dict[str, list] = defaultdict(list)
        per: dict[str, dict[str, Any]] = {n: _empty_counts() for n in names}
        files_meta: dict[tuple[int, int], dict] = {}
        paths = {(t.source, t.file): t.path for t in tasks}
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            _consume_clean(table, staging, rejects, keys, per, files_meta, paths, names)
        staging.flush()
        rejects.flush()
        t_clean = time.perf_counter()

        src = np.asarray(keys["source"], dtype=np.int64)
        n_docs = len(src)
        if n_docs == 0:
            raise ValueError(
                "no document survived reading and cleaning; see the rejects/ dataset and the filter counts "
                f"in the log ({json.dumps({k: v['rejected'] for k, v in per.items()})})"
            )
        fil = np.asarray(keys["file"], dtype=np.int64)
        pos = np.asarray(keys["pos"], dtype=np.int64)
        part = np.asarray(keys["part"], dtype=np.int64)
        n_chars = np.asarray(keys["n_chars"], dtype=np.int64)

        # ---- dedup on the driver over the keys
        dups = _deduplicate(cfg, keys, staging)
        dup_exact, dup_near, candidates = dups.exact, dups.near, dups.candidates
        keep = ~dups.removed
        duplicates_meta = _write_duplicates(out, dups, staging, {"source": src, "file": fil, "pos": pos, "part": part},
                                            names, paths)
        t_dedup = time.perf_counter()

        # ---- split
        is_val = validation_split(doc_uniform(cfg.seed, 1, src, fil, pos, part), n_chars, src, keep,
                                  cfg.pack.validation_fraction)

        # ---- tokenizer
        keep_idx = np.flatnonzero(keep)
        tmp = Path(tempfile.mkdtemp(prefix="r1ray-tok-"))
        sample, sample_src = _sample_for_tokenizer(staging, keep_idx, doc_uniform(cfg.seed, 2, src, fil, pos, part),
                                                   n_chars, cfg.tokenizer.sample_chars, src)
        if cfg.tokenizer.path:
            tok = load_tokenizer(cfg.tokenizer.path)
            missing = [t for t in REASONING_TOKENS if t not in tok.get_vocab()]
            if missing:
                raise ValueError(
                    f"tokenizer.path {cfg.tokenizer.path} lacks the reasoning tokens {missing}; train one "
                    "(unset tokenizer.path) or add them with r1ray.model.tokenizer"
                )
            tok.save_pretrained(str(tmp))
            trained = False
        else:
            tok = train_tokenizer(sample, tmp, vocab_size=cfg.tokenizer.vocab_size)
            trained = True
        _copy_dir_to(tmp, join(out, "tokenizer"))
        tok_sha = tokenizer_sha256(tmp)
        tok_json = (tmp / "tokenizer.json").read_text()
        eos_id = int(tok.eos_token_id)
        shutil.rmtree(tmp, ignore_errors=True)
        t_tok = time.perf_counter()

        # ---- mixing: tokens per source estimated from the sample's tokens per character
        ratio = {}
        enc = tok.backend_tokenizer if hasattr(tok, "backend_tokenizer") else None
        for si, name in enumerate(names):
            texts = [t for t, s in zip(sample, sample_src, strict=True) if s == si]
            chars = sum(len(t) for t in texts)
            toks = sum(len(e.ids) for e in enc.encode_batch(texts, add_special_tokens=False)) if (enc and texts) else 0
            ratio[name] = (toks / chars) if chars else 0.25
        train_keep = keep & ~is_val
        est_tokens = {
            name: float(n_chars[train_keep & (src == si)].sum()) * ratio[name] for si, name in enumerate(names)
        }
        weights = {s.name: s.weight for s in cfg.sources} if cfg.sources[0].weight is not None else None
        rates = mixing_rates(est_tokens, weights)
        mult = np.zeros(n_docs, dtype=np.int64)
        u_mix = doc_uniform(cfg.seed, 3, src, fil, pos, part)
        for si, name in enumerate(names):
            m = train_keep & (src == si)
            mult[m] = multiplicities(rates[name], u_mix[m])
        mult[keep & is_val] = 1
        if mult.max(initial=0) > 255:
            raise ValueError(f"a mixing weight asks for {mult.max()} repeats of a source; lower its weight")
        mixed_out = keep & (mult == 0)

        # ---- counts per source (each document lands in exactly one bucket)
        for si, name in enumerate(names):
            m = src == si
            c = per[name]
            c["duplicate_exact"] = int((dup_exact & m).sum())
            c["duplicate_near"] = int((dup_near & m).sum())
            if int((mixed_out & m).sum()):
                c["filtered"]["mixing"] = int((mixed_out & m).sum())
            c["kept"] = int((keep & ~mixed_out & m).sum())
            c["kept_validation"] = int((keep & is_val & m).sum())
            c["repeats"] = int(np.maximum(mult[m] - 1, 0).sum())
            c["chars_kept"] = int(n_chars[keep & ~mixed_out & m].sum())
            record("r1ray_data_docs_duplicate", c["duplicate_exact"], source=name, kind="exact")
            record("r1ray_data_docs_duplicate", c["duplicate_near"], source=name, kind="near")
            record("r1ray_data_docs_kept", c["kept"], source=name)
            if c["filtered"].get("mixing"):
                record("r1ray_data_docs_filtered", c["filtered"]["mixing"], source=name, reason="mixing")

        # ---- pass 3: tokenize and pack, in corpus order
        tok_ref = ray.put(tok_json)
        split_u8 = is_val.astype(np.uint8)
        mult_u8 = mult.astype(np.uint8)
        pack_items = []
        for k in range(int(mult.max(initial=0))):
            start = 0
            for uri, rows in staging.files:
                mm = mult_u8[start : start + rows]
                if (mm > k).any():
                    pack_items.append({"path": uri, "pass_idx": k, "mult": mm.tobytes(),
                                       "split": split_u8[start : start + rows].tobytes()})
                start += rows
        writers = {s: ShardWriter(out, s, cfg.pack.seq_len, cfg.pack.max_shard_bytes) for s in ("train", "validation")}
        tokens_per_source = {s: Counter() for s in ("train", "validation")}
        if pack_items:
            tds = ray.data.from_items(pack_items, override_num_blocks=len(pack_items)).map_batches(
                _tokenize_file, batch_size=1, batch_format="numpy", num_cpus=1,
                fn_kwargs={"tok_ref": tok_ref, "eos_id": eos_id},
            )
            for table in tds.iter_batches(batch_size=None, batch_format="pyarrow"):
                ids = table.column("ids").combine_chunks()
                lengths = ids.value_lengths().to_numpy()
                flat = ids.flatten().to_numpy()
                split = table.column("split").to_numpy()
                srcs = table.column("source").to_numpy()
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for s_code, s_name in ((0, "train"), (1, "validation")):
                    sel = np.flatnonzero(split == s_code)
                    if len(sel) == 0:
                        continue
                    if len(sel) == len(split):
                        writers[s_name].add(flat)
                    else:
                        writers[s_name].add(np.concatenate([flat[offsets[i] : offsets[i + 1]] for i in sel]))
                    for si in np.unique(srcs[sel]):
                        tokens_per_source[s_name][names[si]] += int(lengths[sel][srcs[sel] == si].sum())
        for w in writers.values():
            w.close()
        t_pack = time.perf_counter()
    finally:
        ctx.execution_options.preserve_order = saved_order

    # ---- manifest (last)
    train_tokens = sum(tokens_per_source["train"].values())
    for name in names:
        per[name]["tokens"] = {s: int(tokens_per_source[s][name]) for s in ("train", "validation")}
    mixing = {
        "weights": weights,
        "tokens_per_char_estimate": ratio,
        "estimated_tokens_before_mixing": est_tokens,
        "rates": rates,
        "realized_train_share": {n: (tokens_per_source["train"][n] / train_tokens if train_tokens else 0.0)
                                 for n in names},
    }
    if weights:
        wsum = sum(weights.values())
        mixing["target_train_share"] = {n: w / wsum for n, w in weights.items()}
    totals = {
        k: sum(per[n][k] for n in names)
        for k in ("read", "kept", "duplicate_exact", "duplicate_near", "kept_validation", "documents_split")
    }
    totals["filtered"] = sum(sum(per[n]["filtered"].values()) for n in names)
    totals["rejected"] = sum(sum(per[n]["rejected"].values()) for n in names)
    totals["near_dup_candidates"] = int(candidates)
    totals["train_rows"], totals["validation_rows"] = writers["train"].rows, writers["validation"].rows
    totals["train_tokens"], totals["validation_tokens"] = writers["train"].tokens, writers["validation"].tokens
    totals["tail_tokens_dropped"] = writers["train"].tail_dropped + writers["validation"].tail_dropped
    timings = {"clean_s": t_clean - t_start, "dedup_s": t_dedup - t_clean, "tokenizer_s": t_tok - t_dedup,
               "pack_s": t_pack - t_tok, "total_s": time.perf_counter() - t_start}
    sources_meta = []
    for si, s in enumerate(cfg.sources):
        sources_meta.append({
            "name": s.name, "format": s.format, "path": s.path,
            "files": [files_meta[k] for k in sorted(files_meta) if k[0] == si and s.format != "reasoning"],
            **({"generator": {"seed": cfg.seed, "num_docs": s.num_docs}} if s.format == "reasoning" else {}),
        })
    if not cfg.keep_work_dir:
        fs, p = filesystem(work)
        if fs.get_file_info(p).type == pafs.FileType.Directory:
            fs.delete_dir(p)
    write_manifest(
        out, stage="data", config=cfg, counts={**totals, "per_source": per}, started_at=started_at,
        seq_len=cfg.pack.seq_len,
        tokenizer={"path": "tokenizer", "sha256": tok_sha, "vocab_size": len(tok), "trained": trained,
                   "eos_token_id": eos_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                   "loaded_from": cfg.tokenizer.path},
        splits={s: {"shards": w.shards, "rows": w.rows, "tokens": w.tokens} for s, w in writers.items()},
        rejects={"files": rejects.files, "rows": sum(f["rows"] for f in rejects.files)},
        sources=sources_meta, mixing=mixing,
        dedup={"exact": cfg.dedup.exact, "near": cfg.dedup.near, "candidates": int(candidates),
               "verified_pairs": dups.verified_pairs},
        duplicates=duplicates_meta,
        timings_s=timings,
    )
    log.info(
        "data stage done in %.1fs: read %d, kept %d (%d exact + %d near duplicates, %d filtered, %d rejected); "
        "train %d rows, validation %d rows of %d tokens -> %s",
        timings["total_s"], totals["read"], totals["kept"], totals["duplicate_exact"], totals["duplicate_near"],
        totals["filtered"], totals["rejected"], totals["train_rows"], totals["validation_rows"], cfg.pack.seq_len, out,
    )
    return out


def _empty_counts() -> dict[str, Any]:
    return {"read": 0, "kept": 0, "duplicate_exact": 0, "duplicate_near": 0, "filtered": {}, "rejected": {},
            "documents_split": 0, "changed": {}, "pii": {}, "kept_validation": 0, "repeats": 0, "chars_kept": 0}


def _consume_clean(table: pa.Table, staging: _Staging, rejects: _Rejects, keys: dict[str, list],
                   per: dict[str, dict], files_meta: dict, paths: dict, names: list[str]) -> None:
    from r1ray.data.clean import EDIT_NAMES

    status = table.column("status").to_numpy(zero_copy_only=False)
    reason = table.column("reason").to_pylist()
    source = table.column("source").to_numpy()
    fil = table.column("file").to_numpy()
    pos = table.column("pos").to_numpy()
    part = table.column("part").to_numpy()
    edits = table.column("edits").to_numpy()
    is_file = status == STATUS_FILE
    for i in np.flatnonzero(is_file):
        files_meta[(int(source[i]), int(fil[i]))] = {
            "path": paths[(int(source[i]), int(fil[i]))], "sha256": reason[i],
            "bytes": int(table.column("n_chars")[int(i)].as_py()),
        }
    texts = None
    for i in np.flatnonzero(~is_file):
        name = names[source[i]]
        c = per[name]
        c["read"] += 1
        if part[i] > 0 and status[i] != STATUS_REJECTED:
            # Count each split document once, on its second piece.
            if part[i] == 1:
                c["documents_split"] += 1
        for bit, label in EDIT_NAMES.items():
            if edits[i] & bit:
                c["changed"][label] = c["changed"].get(label, 0) + 1
        if status[i] == STATUS_REJECTED:
            c["rejected"][reason[i]] = c["rejected"].get(reason[i], 0) + 1
            if texts is None:
                texts = table.column("text").to_pylist()
            rejects.add(name, paths[(int(source[i]), int(fil[i]))], int(pos[i]), int(part[i]), reason[i],
                        texts[i] or "")
            record("r1ray_data_docs_rejected", 1, source=name, reason=reason[i])
        elif status[i] == STATUS_FILTERED:
            c["filtered"][reason[i]] = c["filtered"].get(reason[i], 0) + 1
            record("r1ray_data_docs_filtered", 1, source=name, reason=reason[i])
    for k in PII_KINDS:
        col = table.column(f"pii_{k}").to_numpy()
        if col.any():
            for si in np.unique(source[col > 0]):
                n = int(col[source == si].sum())
                d = per[names[si]]["pii"]
                d[k] = d.get(k, 0) + n
                record("r1ray_data_pii_replaced", n, kind=k)
    for si in np.unique(source[~is_file]):
        record("r1ray_data_docs_read", float(((source == si) & ~is_file).sum()), source=names[si])
    ok = np.flatnonzero(status == STATUS_OK)
    if len(ok):
        sel = table.take(pa.array(ok))
        staging.add(sel.select(["text", "source", "doc_id"]))
        for col in ("source", "file", "pos", "part", "exact", "n_chars"):
            keys[col].extend(sel.column(col).to_numpy().tolist())
        for col in ("bands", "sig"):
            arr = sel.column(col).combine_chunks()
            keys[col].append(arr.flatten().to_numpy())


def ensure_default(storage: StorageConfig, ray_cfg: RayConfig | None = None) -> str:
    """``<storage.root>/data/default``, prepared from the default corpus first if it is not complete."""
    cfg = PrepareDataConfig(storage=storage, ray=ray_cfg or RayConfig())
    uri = cfg.artifact_uri()
    if is_complete(uri):
        try:
            read_manifest(uri, stage="data")
            return uri
        except Exception as e:  # noqa: BLE001 - an unreadable manifest means: prepare it again
            log.warning("default data artifact at %s is unusable (%s); preparing it again", uri, e)
    log.info("no complete default data artifact at %s: preparing the default corpus", uri)
    return run(cfg)


def summary(uri: str) -> str:
    """A short human summary of a data artifact (used by the job's last log line)."""
    m = read_manifest(uri, stage="data")
    c = m["counts"]
    return (f"{uri}: {c['train_rows']} train + {c['validation_rows']} validation rows of {m['seq_len']} tokens, "
            f"{c['kept']} documents kept of {c['read']} read")


__all__ = ["run", "ensure_default", "summary", "CLEAN_SCHEMA"]
