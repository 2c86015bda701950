"""The data stage on Ray Data: read → clean → PII → decontaminate → dedup → tokenize → mix → pack.

Two streaming passes, each a Ray Data dataset of task-based ``map_batches`` (no actor pools: on 2 CPUs an
actor pool holding every CPU starves the reader) consumed in order on the driver. ``_run`` calls the
phases in order; each is a function of what the earlier ones produced:

1. ``_clean_pass``: one task per input file (or generated-sample range) reads it, turns bad rows into
   rejects, normalises, splits gigantic documents, filters, scrubs PII, checks eval n-grams and computes
   the exact hash and MinHash signature. The driver streams the results into staged Parquet
   (``_work/clean``, ``r1ray/data/staging.py``), the rejects into ``rejects/``, and keeps only the small
   per-document keys in memory.
2. ``deduplicate`` / ``write_duplicates`` (``r1ray/data/duplicates.py``): exact and verified near
   duplicates from the keys, and the ``duplicates/`` audit dataset.
3. ``validation_split``, ``_prepare_tokenizer`` (train or load, on a sample of the kept documents),
   ``_mix`` (per-document multiplicities), ``_count_per_source``.
4. ``_pack_pass``: one task per staged file (and mixing pass) tokenizes the selected documents with a
   module-level cached tokenizer; the driver packs them in corpus order into ``seq_len`` rows and writes
   the shards. ``_write_stage_manifest`` writes the manifest last, atomically.

Ray Data's ``preserve_order`` makes the driver see results in corpus order whatever the scheduling, so
the same input and seed give byte-identical shards. Memory stays bounded: Ray Data back-pressures
the tasks against the object store, and the driver holds one batch plus the keys (~0.6 KB a document
at 16 bands, ~0.75 KB at 32).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
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
from r1ray.data.duplicates import Dedup
from r1ray.data.shards import SPLITS
from r1ray.data.staging import Rejects, Staging, read_staged
from r1ray.observe.log import get_logger
from r1ray.observe.metrics import record

log = get_logger(__name__)

STATUS_OK, STATUS_REJECTED, STATUS_FILTERED, STATUS_FILE = "ok", "rejected", "filtered", "file"

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
    from r1ray.data import dedup as D
    from r1ray.data.sources import FileTask, ReadStats, read_records

    cfg = _CACHE.get(cfg_json) or _CACHE.setdefault(cfg_json, PrepareDataConfig.model_validate_json(cfg_json))
    eval_set = _cached_get(eval_ref)
    a, b = D.permutations(cfg.dedup.num_perm, cfg.dedup.seed)
    for t in range(len(batch["source"])):
        task = FileTask(**{k: (v[t].item() if hasattr(v[t], "item") else v[t]) for k, v in batch.items()})
        src: SourceConfig = cfg.sources[task.source]
        stats = ReadStats()
        out = _CleanBatch(task, a, b, cfg.dedup)
        for rec in read_records(task, src, cfg.clean.max_line_bytes, cfg.seed, stats):
            if rec.reason is not None:
                out.add(rec.pos, 0, STATUS_REJECTED, rec.reason, rec.raw)
            else:
                for part_idx, piece, edits in _pieces(rec, src, cfg, out):
                    _clean_piece(rec, part_idx, piece, edits, src, cfg, eval_set, out)
            if len(out) >= cfg.batch_size:
                yield out.flush()
        # The file's own summary row: bytes read and their SHA-256 (the manifest's input hashes); a file cut
        # into ranges was hashed whole when it was cut, and its first range reports that.
        if task.length < 0:
            out.add(-2, 0, STATUS_FILE, stats.sha.hexdigest(), task.path, n_chars=stats.bytes)
        elif task.offset == 0:
            out.add(-2, 0, STATUS_FILE, task.sha256, task.path, n_chars=task.size)
        yield out.flush()


def _pieces(rec: Any, src: SourceConfig, cfg: PrepareDataConfig, out: _CleanBatch) -> list[tuple[int, str, int]]:
    """Normalise a record; ``(part, text, edit flags)`` of its documents (a gigantic one split, truncated or
    rejected per ``clean.oversize``; an empty one rejected)."""
    from r1ray.data import clean as C

    c = cfg.clean
    text, edits = C.normalize(rec.text, unicode_form=c.unicode_form, collapse_whitespace=src.collapse_whitespace)
    if not text:
        out.add(rec.pos, 0, STATUS_REJECTED, "empty_document", rec.text[:200], edits=edits)
        return []
    if len(text) <= c.max_chars:
        return [(0, text, edits)]
    if c.oversize == "reject":
        out.add(rec.pos, 0, STATUS_REJECTED, "oversize_document", text[:200], edits=edits)
        return []
    if c.oversize == "truncate":
        return [(0, text[: c.max_chars], edits | C.EDIT_TRUNCATED)]
    # A split document's extra pieces are counted as documents of their own (part > 0).
    return [(i, piece, edits) for i, piece in enumerate(C.split_oversize(text, c.max_chars))]


def _clean_piece(rec: Any, part: int, piece: str, edits: int, src: SourceConfig, cfg: PrepareDataConfig,
                 eval_set: Any, out: _CleanBatch) -> None:
    """One document through the filters (C4 lines, quality), PII, decontamination and hashing: one row."""
    from r1ray.data import clean as C
    from r1ray.data import dedup as D
    from r1ray.data.decontam import contaminated

    c, dd = cfg.clean, cfg.dedup
    if len(piece) < c.min_chars:
        out.add(rec.pos, part, STATUS_FILTERED, "too_short", edits=edits)
        return
    if src.c4_rules:
        piece, reason, lines_removed = C.c4_lines(piece, c.c4)
        edits |= C.EDIT_C4_LINES if lines_removed else 0
        if reason is not None:
            out.add(rec.pos, part, STATUS_FILTERED, reason, edits=edits)
            return
    if src.quality_filters and (reason := C.quality_reason(piece, c.quality)) is not None:
        out.add(rec.pos, part, STATUS_FILTERED, reason, edits=edits)
        return
    if src.languages is not None:
        lang, prob = C.identify_language(piece)
        if lang not in src.languages or prob < src.min_language_prob:
            out.add(rec.pos, part, STATUS_FILTERED, "language", edits=edits)
            return
    piece, pii = C.scrub_pii(piece, c.pii)
    wh = D.word_hashes(piece) if (dd.near or len(eval_set)) else None
    if wh is not None and contaminated(wh, eval_set, cfg.decontam.ngram):
        out.add(rec.pos, part, STATUS_FILTERED, "decontaminated", edits=edits, pii=pii)
        return
    sh = np.unique(D.ngram_hashes(wh, dd.shingle_size)) if dd.near else None
    out.add(rec.pos, part, STATUS_OK, "", piece, exact=D.exact_hash(piece), n_chars=len(piece), edits=edits,
            pii=pii, sh=sh, doc_id=rec.doc_id)


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
            # The fast path skips computing character offsets, which packing never reads (same ids).
            encs = tok.encode_batch_fast(texts[lo : lo + 1024], add_special_tokens=False)
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


def _num_blocks(tasks: list) -> int:
    """Blocks of read tasks: small files share a block (a Ray task each block), big files get their own."""
    total = sum(t.size if t.length < 0 else t.length for t in tasks) + sum(t.count for t in tasks) * 300
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
    for sub in (*SPLITS, "rejects", "duplicates", "tokenizer", "_work"):
        if fs.get_file_info(f"{p}/{sub}").type == pafs.FileType.Directory:
            fs.delete_dir(f"{p}/{sub}")


def _copy_dir_to(local: Path, uri: str) -> None:
    for f in sorted(local.iterdir()):
        if f.is_file():
            write_bytes_atomic(join(uri, f.name), f.read_bytes())


def run(cfg: PrepareDataConfig) -> str:
    """Run the data stage; returns the artifact URI (a complete artifact: ``DataArtifact.load`` works)."""
    from r1ray.runtime import ray_session

    with ray_session(cfg.ray):
        return _run(cfg)


def _run(cfg: PrepareDataConfig) -> str:
    """The phases in order; each takes what the ones before it produced and is readable on its own."""
    from r1ray.data.duplicates import deduplicate, write_duplicates

    clock, started_at = {"start": time.perf_counter()}, now()
    out = cfg.artifact_uri()
    tasks = _plan_sources(cfg, out)
    with _corpus_order():
        corpus = _clean_pass(cfg, tasks, out)
        clock["clean"] = time.perf_counter()
        docs = _staged_docs(corpus)
        dups = deduplicate(cfg.dedup, np.concatenate(corpus.keys["exact"]), corpus.staging)
        corpus.keys.clear()
        duplicates = write_duplicates(out, dups, corpus.staging, docs.coords(), corpus.names, corpus.paths)
        clock["dedup"] = time.perf_counter()
        keep = ~dups.removed
        split = _held_out_splits(cfg, docs, keep)
        tok = _prepare_tokenizer(cfg, corpus.staging, docs, keep, out)
        clock["tokenizer"] = time.perf_counter()
        mix = _mix(cfg, corpus.names, tok, docs, keep, split)
        _count_per_source(corpus, docs, dups, keep, split, mix)
        packed = _pack_pass(cfg, corpus, tok, mix, split, out)
        clock["pack"] = time.perf_counter()
    if not cfg.keep_work_dir:
        fs, p = filesystem(corpus.staging.work)
        if fs.get_file_info(p).type == pafs.FileType.Directory:
            fs.delete_dir(p)
    _write_stage_manifest(cfg, out, started_at, clock, corpus, dups, duplicates, tok, mix, packed)
    return out


# ---------------------------------------------------------------------------------------------------
# Phases (driver)
# ---------------------------------------------------------------------------------------------------


def _plan_sources(cfg: PrepareDataConfig, out: str) -> list:
    """The read tasks of every source (problems fail here, before any work), and an empty output."""
    from r1ray.data.sources import plan

    tasks, problems = plan(cfg.sources, chunk_bytes=cfg.read_chunk_bytes)
    wanted = sorted({lang for s in cfg.sources for lang in (s.languages or [])})
    if wanted:
        from r1ray.data.clean import supported_languages

        unknown = sorted(set(wanted) - set(supported_languages()))
        if unknown:
            problems.append(f"sources[].languages: {unknown} are not identified by py3langid; it knows "
                            f"{supported_languages()}")
    if problems:
        raise ValueError("cannot read the sources:\n  - " + "\n  - ".join(problems))
    _prepare_output(out, cfg.overwrite)
    log.info("data stage: %d sources, %d read tasks -> %s", len(cfg.sources), len(tasks), out)
    return tasks


@contextmanager
def _corpus_order() -> Iterator[None]:
    """Ray Data delivers results in corpus order whatever the scheduling: deterministic shards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = saved


@dataclass
class _Corpus:
    """What the clean pass leaves on the driver: staged text, rejects, per-document keys, counts."""

    names: list[str]
    paths: dict[tuple[int, int], str]
    """(source, file) -> path of every read task."""
    staging: Staging
    rejects: Rejects
    keys: dict[str, list]
    """Per staged document, in chunks of int64 arrays: source, file, pos, part, exact, n_chars."""
    per: dict[str, dict[str, Any]]
    """The manifest's per-source counts, filled as the phases go."""
    files_meta: dict[tuple[int, int], dict]
    """(source, file) -> path, SHA-256 and bytes read: the manifest's input hashes."""


def _clean_pass(cfg: PrepareDataConfig, tasks: list, out: str) -> _Corpus:
    """Pass 1 on Ray Data: read, clean, scrub, decontaminate and sign every document; stream the kept text
    into staging, rejects into rejects/ and the small per-document keys into driver memory."""
    import ray

    from r1ray.data.decontam import eval_ngrams

    eval_set = eval_ngrams(cfg.decontam.eval_files, cfg.decontam.eval_text_fields, cfg.decontam.ngram)
    if cfg.decontam.eval_files:
        log.info("decontamination: %d distinct %d-grams from %d eval files", len(eval_set),
                 cfg.decontam.ngram, len(cfg.decontam.eval_files))
    ds = ray.data.from_items([t.__dict__ for t in tasks], override_num_blocks=_num_blocks(tasks)).map_batches(
        _clean_file, batch_size=1, batch_format="numpy", num_cpus=1,
        fn_kwargs={"cfg_json": cfg.model_dump_json(), "eval_ref": ray.put(eval_set)},
    )
    names = [s.name for s in cfg.sources]
    corpus = _Corpus(names=names, paths={(t.source, t.file): t.path for t in tasks},
                     staging=Staging(join(out, "_work")), rejects=Rejects(out, names), keys=defaultdict(list),
                     per={n: _empty_counts() for n in names}, files_meta={})
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        _consume_clean(table, corpus)
    corpus.staging.flush()
    corpus.rejects.flush()
    return corpus


@dataclass
class _Docs:
    """The staged documents' ids as arrays (index = ordinal in staging)."""

    source: np.ndarray
    file: np.ndarray
    pos: np.ndarray
    part: np.ndarray
    n_chars: np.ndarray

    def coords(self) -> dict[str, np.ndarray]:
        return {"source": self.source, "file": self.file, "pos": self.pos, "part": self.part}

    def uniform(self, seed: int, salt: int) -> np.ndarray:
        """A seeded uniform number per document from its id (split, tokenizer sample, mixing draws)."""
        from r1ray.data.mix import doc_uniform

        return doc_uniform(seed, salt, self.source, self.file, self.pos, self.part)


def _staged_docs(corpus: _Corpus) -> _Docs:
    keys = corpus.keys
    if not any(len(k) for k in keys["source"]):
        raise ValueError(
            "no document survived reading and cleaning; see the rejects/ dataset and the filter counts "
            f"in the log ({json.dumps({k: v['rejected'] for k, v in corpus.per.items()})})"
        )
    return _Docs(*(np.concatenate(keys[k]) for k in ("source", "file", "pos", "part", "n_chars")))


def _held_out_splits(cfg: PrepareDataConfig, docs: _Docs, keep: np.ndarray) -> np.ndarray:
    """Each document's split code (index into SPLITS): per source, ``validation_fraction`` and then
    ``test_fraction`` of its kept text, whole documents in the order of two independent seeded hashes."""
    from r1ray.data.mix import validation_split

    p = cfg.pack
    is_val = validation_split(docs.uniform(cfg.seed, 1), docs.n_chars, docs.source, keep, p.validation_fraction)
    # The test share is of the whole kept text: scale it to what validation left.
    rest = p.test_fraction / (1.0 - p.validation_fraction)
    is_test = validation_split(docs.uniform(cfg.seed, 4), docs.n_chars, docs.source, keep & ~is_val, rest)
    split = np.zeros(len(keep), dtype=np.uint8)
    split[is_val] = SPLITS.index("validation")
    split[is_test] = SPLITS.index("test")
    return split


@dataclass
class _Tokenizer:
    tok: Any
    """The transformers tokenizer (trained or loaded)."""
    json: str
    """Its tokenizer.json, shipped to the tokenize tasks."""
    sha256: str
    trained: bool
    sample: list[str]
    """The kept documents it was trained on (also the mixing phase's tokens-per-character sample)."""
    sample_source: list[int]


def _prepare_tokenizer(cfg: PrepareDataConfig, staging: Staging, docs: _Docs, keep: np.ndarray,
                       out: str) -> _Tokenizer:
    """Train a BPE on a seeded sample of the kept documents, or load ``tokenizer.path``; write tokenizer/."""
    from r1ray.model.tokenizer import load_tokenizer, tokenizer_sha256, train_tokenizer

    sample, sample_src = _sample_for_tokenizer(staging, np.flatnonzero(keep), docs.uniform(cfg.seed, 2),
                                               docs.n_chars, cfg.tokenizer.sample_chars, docs.source)
    tmp = Path(tempfile.mkdtemp(prefix="r1ray-tok-"))
    try:
        if cfg.tokenizer.path:
            tok = load_tokenizer(cfg.tokenizer.path)
            check_reasoning_tokens(tok, cfg.tokenizer.path)
            tok.save_pretrained(str(tmp))
        else:
            tok = train_tokenizer(sample, tmp, vocab_size=cfg.tokenizer.vocab_size,
                                  split_digits=cfg.tokenizer.split_digits)
        _copy_dir_to(tmp, join(out, "tokenizer"))
        return _Tokenizer(tok=tok, json=(tmp / "tokenizer.json").read_text(), sha256=tokenizer_sha256(tmp),
                          trained=not cfg.tokenizer.path, sample=sample, sample_source=sample_src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_reasoning_tokens(tok: Any, path: str) -> None:
    """A loaded tokenizer must hold the reasoning tokens as single tokens; say how to fix it when not."""
    from r1ray.model.tokenizer import REASONING_TOKENS

    missing = [t for t in REASONING_TOKENS if t not in tok.get_vocab()]
    if missing:
        raise ValueError(
            f"tokenizer.path {path} lacks the reasoning tokens {missing}. Either unset tokenizer.path to train "
            "one, or add them and save it again: tok = transformers.AutoTokenizer.from_pretrained(path); "
            f"tok.add_special_tokens({{'additional_special_tokens': {list(REASONING_TOKENS)}}}); "
            "tok.save_pretrained(path)"
        )


def _sample_for_tokenizer(staging: Staging, keep_ordinals: np.ndarray, u: np.ndarray, n_chars: np.ndarray,
                          budget: int, sources: np.ndarray) -> tuple[list[str], list[int]]:
    """Kept documents in the order of a per-document uniform number until ``budget`` characters."""
    order = keep_ordinals[np.argsort(u[keep_ordinals], kind="stable")]
    cum = np.cumsum(n_chars[order])
    chosen = np.sort(order[: max(1, int(np.searchsorted(cum, budget)) + 1)])
    return read_staged(staging, chosen, "text"), sources[chosen].tolist()


@dataclass
class _Mix:
    mult: np.ndarray
    """How many times each staged document is packed (0: not at all; held-out documents once)."""
    mixed_out: np.ndarray
    """Kept documents that mixing down-sampled away."""
    manifest: dict[str, Any]
    """Weights, tokens-per-character, estimated tokens and rates (the realised shares are added later)."""


def _mix(cfg: PrepareDataConfig, names: list[str], tok: _Tokenizer, docs: _Docs, keep: np.ndarray,
         split: np.ndarray) -> _Mix:
    """Per-document multiplicities that bring each source to its target share of training tokens; tokens
    per source are estimated from the tokenizer sample's tokens per character."""
    from r1ray.data.mix import mixing_rates, multiplicities

    ratio = {}
    enc = tok.tok.backend_tokenizer if hasattr(tok.tok, "backend_tokenizer") else None
    for si, name in enumerate(names):
        texts = [t for t, s in zip(tok.sample, tok.sample_source, strict=True) if s == si]
        chars = sum(len(t) for t in texts)
        toks = sum(len(e.ids) for e in enc.encode_batch_fast(texts, add_special_tokens=False)) if (enc and texts) else 0
        ratio[name] = (toks / chars) if chars else 0.25
    train_keep = keep & (split == 0)
    est_tokens = {
        name: float(docs.n_chars[train_keep & (docs.source == si)].sum()) * ratio[name] for si, name in enumerate(names)
    }
    weights = {s.name: s.weight for s in cfg.sources} if cfg.sources[0].weight is not None else None
    rates = mixing_rates(est_tokens, weights)
    mult = np.zeros(len(keep), dtype=np.int64)
    u_mix = docs.uniform(cfg.seed, 3)
    for si, name in enumerate(names):
        m = train_keep & (docs.source == si)
        mult[m] = multiplicities(rates[name], u_mix[m])
    mult[keep & (split != 0)] = 1  # held-out documents once, never mixed
    if mult.max(initial=0) > 255:
        raise ValueError(f"a mixing weight asks for {mult.max()} repeats of a source; lower its weight")
    manifest: dict[str, Any] = {"weights": weights, "tokens_per_char_estimate": ratio,
                                "estimated_tokens_before_mixing": est_tokens, "rates": rates}
    return _Mix(mult=mult, mixed_out=keep & (mult == 0), manifest=manifest)


def _count_per_source(corpus: _Corpus, docs: _Docs, dups: Dedup, keep: np.ndarray, split: np.ndarray,
                      mix: _Mix) -> None:
    """The per-source counts of the driver's decisions (each document lands in exactly one bucket)."""
    for si, name in enumerate(corpus.names):
        m = docs.source == si
        c = corpus.per[name]
        c["duplicate_exact"] = int((dups.exact & m).sum())
        c["duplicate_near"] = int((dups.near & m).sum())
        if int((mix.mixed_out & m).sum()):
            c["filtered"]["mixing"] = int((mix.mixed_out & m).sum())
        c["kept"] = int((keep & ~mix.mixed_out & m).sum())
        c["kept_validation"] = int((keep & (split == 1) & m).sum())
        c["kept_test"] = int((keep & (split == 2) & m).sum())
        c["repeats"] = int(np.maximum(mix.mult[m] - 1, 0).sum())
        c["chars_kept"] = int(docs.n_chars[keep & ~mix.mixed_out & m].sum())
        record("r1ray_data_docs_duplicate", c["duplicate_exact"], source=name, kind="exact")
        record("r1ray_data_docs_duplicate", c["duplicate_near"], source=name, kind="near")
        record("r1ray_data_docs_kept", c["kept"], source=name)
        if c["filtered"].get("mixing"):
            record("r1ray_data_docs_filtered", c["filtered"]["mixing"], source=name, reason="mixing")


@dataclass
class _Packed:
    writers: dict[str, Any]
    """split -> its ShardWriter (closed)."""
    tokens_per_source: dict[str, Counter]


def _pack_items(staging: Staging, mult: np.ndarray, split: np.ndarray) -> list[dict]:
    """Tokenize work units: (staged file, mixing pass) with the file's multiplicities and split codes."""
    split_u8, mult_u8 = split.astype(np.uint8), mult.astype(np.uint8)
    items = []
    for k in range(int(mult.max(initial=0))):
        start = 0
        for uri, rows in staging.files:
            mm = mult_u8[start : start + rows]
            if (mm > k).any():
                items.append({"path": uri, "pass_idx": k, "mult": mm.tobytes(),
                              "split": split_u8[start : start + rows].tobytes()})
            start += rows
    return items


def _pack_pass(cfg: PrepareDataConfig, corpus: _Corpus, tok: _Tokenizer, mix: _Mix, split: np.ndarray,
               out: str) -> _Packed:
    """Pass 2 on Ray Data: tokenize the selected staged documents in tasks; pack them on the driver, in
    corpus order, into ``seq_len`` rows and shards."""
    import ray

    from r1ray.data.pack import ShardWriter

    writers = {s: ShardWriter(out, s, cfg.pack.seq_len, cfg.pack.max_shard_bytes) for s in SPLITS}
    tokens_per_source: dict[str, Counter] = {s: Counter() for s in SPLITS}
    items = _pack_items(corpus.staging, mix.mult, split)
    if items:
        tds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _tokenize_file, batch_size=1, batch_format="numpy", num_cpus=1,
            fn_kwargs={"tok_ref": ray.put(tok.json), "eos_id": int(tok.tok.eos_token_id)},
        )
        for table in tds.iter_batches(batch_size=None, batch_format="pyarrow"):
            _pack_batch(table, writers, tokens_per_source, corpus.names)
    for w in writers.values():
        w.close()
    return _Packed(writers=writers, tokens_per_source=tokens_per_source)


def _pack_batch(table: pa.Table, writers: dict[str, Any], tokens_per_source: dict[str, Counter],
                names: list[str]) -> None:
    """Append one tokenized batch (documents + EOS, corpus order) to its split's writer, counting tokens."""
    ids = table.column("ids").combine_chunks()
    lengths = ids.value_lengths().to_numpy()
    flat = ids.flatten().to_numpy()
    split = table.column("split").to_numpy()
    srcs = table.column("source").to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for s_code, s_name in enumerate(SPLITS):
        sel = np.flatnonzero(split == s_code)
        if len(sel) == 0:
            continue
        if len(sel) == len(split):
            writers[s_name].add(flat)
        else:
            writers[s_name].add(np.concatenate([flat[offsets[i] : offsets[i + 1]] for i in sel]))
        for si in np.unique(srcs[sel]):
            tokens_per_source[s_name][names[si]] += int(lengths[sel][srcs[sel] == si].sum())


def _write_stage_manifest(cfg: PrepareDataConfig, out: str, started_at: str, clock: dict[str, float],
                          corpus: _Corpus, dups: Dedup, duplicates: dict, tok: _Tokenizer, mix: _Mix,
                          packed: _Packed) -> None:
    """The manifest (written last, atomically: the artifact is complete once it exists) and the summary log."""
    names, per, writers, tps = corpus.names, corpus.per, packed.writers, packed.tokens_per_source
    train_tokens = sum(tps["train"].values())
    for name in names:
        per[name]["tokens"] = {s: int(tps[s][name]) for s in SPLITS}
    mixing = {**mix.manifest, "realized_train_share": {
        n: (tps["train"][n] / train_tokens if train_tokens else 0.0) for n in names}}
    if mix.manifest["weights"]:
        wsum = sum(mix.manifest["weights"].values())
        mixing["target_train_share"] = {n: w / wsum for n, w in mix.manifest["weights"].items()}
    totals = {
        k: sum(per[n][k] for n in names)
        for k in ("read", "kept", "duplicate_exact", "duplicate_near", "kept_validation", "kept_test",
                  "documents_split")
    }
    totals["filtered"] = sum(sum(per[n]["filtered"].values()) for n in names)
    totals["rejected"] = sum(sum(per[n]["rejected"].values()) for n in names)
    totals["near_dup_candidates"] = int(dups.candidates)
    for s, w in writers.items():
        totals[f"{s}_rows"], totals[f"{s}_tokens"] = w.rows, w.tokens
    totals["tail_tokens_dropped"] = sum(w.tail_dropped for w in writers.values())
    timings = {"clean_s": clock["clean"] - clock["start"], "dedup_s": clock["dedup"] - clock["clean"],
               "tokenizer_s": clock["tokenizer"] - clock["dedup"], "pack_s": clock["pack"] - clock["tokenizer"],
               "total_s": time.perf_counter() - clock["start"]}
    sources_meta = [{
        "name": s.name, "format": s.format, "path": s.path,
        "files": [corpus.files_meta[k] for k in sorted(corpus.files_meta) if k[0] == si and s.format != "reasoning"],
        **({"generator": {"seed": cfg.seed, "num_docs": s.num_docs, "chat_fraction": s.chat_fraction}} if s.format == "reasoning" else {}),
    } for si, s in enumerate(cfg.sources)]
    t = tok.tok
    write_manifest(
        out, stage="data", config=cfg, counts={**totals, "per_source": per}, started_at=started_at,
        seq_len=cfg.pack.seq_len,
        tokenizer={"path": "tokenizer", "sha256": tok.sha256, "vocab_size": len(t), "trained": tok.trained,
                   "eos_token_id": int(t.eos_token_id), "pad_token_id": t.pad_token_id,
                   "bos_token_id": t.bos_token_id, "loaded_from": cfg.tokenizer.path},
        splits={s: {"shards": w.shards, "rows": w.rows, "tokens": w.tokens} for s, w in writers.items()},
        rejects={"files": corpus.rejects.files, "rows": sum(f["rows"] for f in corpus.rejects.files)},
        sources=sources_meta, mixing=mixing,
        dedup={"exact": cfg.dedup.exact, "near": cfg.dedup.near, "candidates": int(dups.candidates),
               "verified_pairs": dups.verified_pairs, "near_matched_on": dups.mode,
               **({"cluster": dups.cluster} if dups.cluster else {})},
        duplicates=duplicates,
        timings_s=timings,
    )
    log.info(
        "data stage done in %.1fs: read %d, kept %d (%d exact + %d near duplicates, %d filtered, %d rejected); "
        "train %d rows, validation %d rows of %d tokens -> %s",
        timings["total_s"], totals["read"], totals["kept"], totals["duplicate_exact"], totals["duplicate_near"],
        totals["filtered"], totals["rejected"], totals["train_rows"], totals["validation_rows"], cfg.pack.seq_len, out,
    )


def _empty_counts() -> dict[str, Any]:
    return {"read": 0, "kept": 0, "duplicate_exact": 0, "duplicate_near": 0, "filtered": {}, "rejected": {},
            "documents_split": 0, "changed": {}, "pii": {}, "kept_validation": 0, "kept_test": 0, "repeats": 0,
            "chars_kept": 0}


def _consume_clean(table: pa.Table, corpus: _Corpus) -> None:
    """Fold one clean-pass table into the corpus: counts and metrics, rejects, staged text and keys."""
    from r1ray.data.clean import EDIT_NAMES

    staging, rejects, keys, per = corpus.staging, corpus.rejects, corpus.keys, corpus.per
    files_meta, paths, names = corpus.files_meta, corpus.paths, corpus.names

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
        # Band keys and signatures go to the staged files with the text (dedup reads them from there, on the
        # driver or in Ray tasks); the driver keeps 6 numbers a document.
        staging.add(sel.select(["text", "source", "doc_id", "bands", "sig"]))
        for col in ("source", "file", "pos", "part", "exact", "n_chars"):
            keys[col].append(sel.column(col).to_numpy().astype(np.int64))


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
    test = f" + {c['test_rows']} test" if c.get("test_rows") else ""
    return (f"{uri}: {c['train_rows']} train + {c['validation_rows']} validation{test} rows of {m['seq_len']} tokens, "
            f"{c['kept']} documents kept of {c['read']} read")


__all__ = ["run", "ensure_default", "summary", "CLEAN_SCHEMA"]
