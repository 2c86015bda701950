"""Dedup decisions on the driver and the ``duplicates/`` audit dataset.

Exact duplicates by content hash first, then near-duplicates among the rest: MinHash LSH candidate pairs,
verified on the true shingle Jaccard of the staged texts (``r1ray.data.dedup``). Every removed document is
written to ``duplicates/`` with the earlier document it matched and the document kept in its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r1ray.artifacts import filesystem, join, write_bytes_atomic
from r1ray.data import dedup as D
from r1ray.data.config import DedupConfig
from r1ray.data.staging import Staging, read_staged

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


@dataclass
class Dedup:
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

    mode: str = "driver"
    """Where near-duplicates were matched: ``driver`` or ``cluster`` (``r1ray.data.dedup_cluster``)."""
    cluster: dict | None = None
    """Tasks, nodes and shuffle rounds of the cluster path."""

    def kept_of(self) -> np.ndarray:
        """For each duplicate, the kept document at the end of its chain of matches (itself otherwise):
        pointer jumping, a few vectorised passes (a chain of length L takes log2 L)."""
        kept = np.arange(len(self.match))
        rem = self.removed
        kept[rem] = self.match[rem]
        while True:
            nxt = kept[kept]
            if np.array_equal(nxt, kept):
                return kept
            kept = nxt


def _staged_matrix(staging: Staging, column: str, width: int, dtype) -> np.ndarray:
    parts = []
    for uri, _ in staging.files:
        fs, p = filesystem(uri)
        with fs.open_input_file(p) as f:
            col = pq.read_table(f, columns=[column]).column(column).combine_chunks()
        parts.append(col.flatten().to_numpy().astype(dtype, copy=False).reshape(-1, width))
    return np.concatenate(parts) if parts else np.zeros((0, width), dtype=dtype)


def deduplicate(dd: DedupConfig, exact_hashes: np.ndarray, staging: Staging) -> Dedup:
    """Exact duplicates by content hash, then near-duplicates among the rest (MinHash LSH, verified).

    ``exact_hashes`` are the staged documents' content hashes, in their order; their band keys and signatures
    are read from the staged files (the driver's memory), or by Ray tasks past ``dd.cluster_above`` documents.
    """
    n = len(exact_hashes)
    first = D.first_occurrence(np.asarray(exact_hashes, dtype=np.int64)) if dd.exact else np.arange(n)
    exact = first != np.arange(n)
    res = Dedup(exact=exact, near=np.zeros(n, dtype=bool), match=np.where(exact, first, -1),
                 estimated=np.where(exact, 1.0, np.nan).astype(np.float32),
                 verified=np.where(exact, 1.0, np.nan).astype(np.float32))
    if not dd.near:
        return res
    alive = np.flatnonzero(~exact)
    if len(alive) > dd.cluster_above:
        from r1ray.data.dedup_cluster import near_duplicates_on_cluster

        near, stats = near_duplicates_on_cluster(staging.files, ~exact, dd)
        hit = np.flatnonzero(near.dropped)
        res.near[hit] = True
        res.match[hit] = near.match[hit]
        res.estimated[hit] = near.estimated[hit]
        res.verified[hit] = near.verified[hit]
        res.candidates, res.verified_pairs = near.candidates, near.verified_pairs
        res.mode, res.cluster = "cluster", {"tasks": stats.tasks, "nodes": stats.nodes, "rounds": stats.rounds}
        return res
    bands = _staged_matrix(staging, "bands", dd.bands, np.int64)[alive]
    sigs = _staged_matrix(staging, "sig", dd.num_perm, np.uint32)[alive]

    def verify(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # Re-read and shingle only the documents of pairs near the threshold (the text is scrubbed and
        # staged exactly as the signature saw it).
        need = np.unique(np.concatenate([alive[a], alive[b]]))
        texts = read_staged(staging, need, "text")
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


def write_duplicates(out: str, dups: Dedup, staging: Staging, coords: dict[str, np.ndarray],
                      names: list[str], paths: dict[tuple[int, int], str]) -> dict[str, Any]:
    """The ``duplicates/`` audit dataset: every removed document, what it matched and the document kept.

    Rows are in corpus order of the removed documents; ``coords`` holds each staged document's source,
    file, pos and part. Returns the manifest's ``duplicates`` entry.
    """
    removed = np.flatnonzero(dups.removed)
    match = dups.match[removed]
    kept = dups.kept_of()[removed]
    need = np.unique(np.concatenate([removed, match, kept]))
    ids = dict(zip(need.tolist(), read_staged(staging, need, "doc_id"), strict=True))

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
