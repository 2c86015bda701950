"""Near-duplicate matching on the cluster: the driver's ``dedup.near_duplicates``, as Ray tasks.

On the driver, near-dedup holds every document's band keys and signature in memory (``bands x 8 + num_perm x 4``
bytes: 768 B at 32 x 4 bands, 7.7 GB at 10 M documents). Past ``dedup.cluster_above`` documents, the same
decisions are computed by Ray tasks that read the band keys and signatures from the staged files (where the
clean pass stored them beside the text), and the driver only receives the duplicates:

1. **map** (a task per staged file): every alive document's ``(band, key)`` goes to the partition of its hash,
   one object per partition, a few bands per round so the shuffle in flight stays bounded;
2. **reduce** (a task per partition and round): sorted by ``(band, key, ordinal)``, each bucket member is
   paired with the bucket's first document and with the member before it (``dedup.candidate_pairs``),
   and the pairs are sent on to the partition of their later document's ordinal range;
3. **score** (a task per ordinal range): distinct pairs, the signature estimate (the signature columns of the
   staged files the pairs touch), verification on the true shingle Jaccard (their staged texts), and each
   later document's best accepted match (``dedup.near_duplicates``'s rule).

Every step is the driver path's arithmetic on the same arrays, so the result is equal, whatever the
partitioning: ``tests/ray/test_data_dedup_cluster.py`` proves it on a simulated two-node cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r1ray.artifacts import filesystem
from r1ray.data import dedup as D
from r1ray.data.config import DedupConfig

_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHUFFLE_BYTES_PER_ROUND = 1 << 30  # (band, key, ordinal) rows of 24 bytes in flight at once, cluster-wide


@dataclass(frozen=True)
class ClusterStats:
    tasks: int
    """Ray tasks run (map, reduce, score)."""
    nodes: int
    """Distinct nodes the tasks ran on."""
    rounds: int
    """Shuffle rounds (groups of bands)."""


def _read_column(uri: str, column: str) -> pa.ChunkedArray:
    fs, p = filesystem(uri)
    with fs.open_input_file(p) as f:
        return pq.read_table(f, columns=[column]).column(column)


def _matrix(col: pa.ChunkedArray, width: int, dtype: Any) -> np.ndarray:
    """A fixed-width list column as an ``(n x width)`` matrix."""
    flat = col.combine_chunks().flatten().to_numpy()
    return flat.astype(dtype, copy=False).reshape(-1, width)


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _partition_of(key: np.ndarray, band: int, parts: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = (key.view(np.uint64) ^ np.uint64(band + 1)) * _MIX
    return ((h >> np.uint64(33)) % np.uint64(parts)).astype(np.int64)


def _map(uri: str, start: int, alive: bytes, bands: list[int], n_bands: int, parts: int) -> tuple:
    """One staged file's ``(band, key, ordinal)`` rows, split by partition: ``parts`` arrays and the node."""
    keys = _matrix(_read_column(uri, "bands"), n_bands, np.int64)
    ok = np.frombuffer(alive, dtype=bool)
    rows = np.flatnonzero(ok)
    out: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for b in bands:
        k = keys[rows, b]
        sel = k != 0  # 0: a document without shingles takes no part
        k, o = k[sel], rows[sel] + start
        p = _partition_of(k, b, parts)
        order = np.argsort(p, kind="stable")
        bounds = np.searchsorted(p[order], np.arange(parts + 1))
        for q in range(parts):
            idx = order[bounds[q] : bounds[q + 1]]
            if len(idx):
                out[q].append(np.stack([np.full(len(idx), b, dtype=np.int64), k[idx], o[idx]]))
    return (*(np.concatenate(x, axis=1) if x else np.zeros((3, 0), dtype=np.int64) for x in out), _node())


def _reduce(range_starts: np.ndarray, *chunks: np.ndarray) -> tuple:
    """One partition's candidate pairs ``(later, earlier)``, split by the ordinal range of ``later``."""
    rows = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), dtype=np.int64)
    band, key, ordinal = rows
    order = np.lexsort((ordinal, key, band))
    band, key, ordinal = band[order], key[order], ordinal[order]
    same = np.flatnonzero((band[1:] == band[:-1]) & (key[1:] == key[:-1])) + 1
    later_parts: list[np.ndarray] = []
    earlier_parts: list[np.ndarray] = []
    if len(same):
        run_start = np.ones(len(band), dtype=bool)
        run_start[same] = False
        anchor_pos = np.maximum.accumulate(np.where(run_start, np.arange(len(band)), 0))
        members, anchors, prev = ordinal[same], ordinal[anchor_pos[same]], ordinal[same - 1]
        later_parts = [members, members[prev != anchors]]
        earlier_parts = [anchors, prev[prev != anchors]]
    later = np.concatenate(later_parts) if later_parts else np.zeros(0, dtype=np.int64)
    earlier = np.concatenate(earlier_parts) if earlier_parts else np.zeros(0, dtype=np.int64)
    q = np.searchsorted(range_starts, later, side="right") - 1
    out = tuple(np.stack([later[q == i], earlier[q == i]]) for i in range(len(range_starts)))
    return (*out, _node())


def _gather(files: list[tuple[str, int]], starts: np.ndarray, ordinals: np.ndarray, column: str, width: int,
            dtype: Any) -> np.ndarray:
    """Rows of a fixed-width list column at sorted ``ordinals``, reading only the staged files they are in."""
    out = np.empty((len(ordinals), width), dtype=dtype)
    for i, (uri, rows) in enumerate(files):
        lo, hi = np.searchsorted(ordinals, [starts[i], starts[i] + rows])
        if hi > lo:
            m = _matrix(_read_column(uri, column), width, dtype)
            out[lo:hi] = m[ordinals[lo:hi] - starts[i]]
    return out


def _score(files: list[tuple[str, int]], dd_json: str, *pairs: np.ndarray) -> tuple:
    """One ordinal range's decisions: ``(later, match, estimated, verified)`` of its dropped documents, the
    distinct candidate pairs and the verified pairs (``dedup.near_duplicates``' rule)."""
    dd = DedupConfig.model_validate_json(dd_json)
    starts = np.concatenate([[0], np.cumsum([r for _, r in files])[:-1]]).astype(np.int64)
    both = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), dtype=np.int64)
    n_total = int(starts[-1] + files[-1][1]) if files else 0
    code = np.unique(both[0] * n_total + both[1])
    later, earlier = code // n_total, code % n_total
    need = np.unique(np.concatenate([later, earlier]))
    sigs = _gather(files, starts, need, "sig", dd.num_perm, np.uint32)
    a, b = np.searchsorted(need, later), np.searchsorted(need, earlier)
    est = D.estimated_jaccard(sigs, a, b)
    true = np.full(len(later), np.nan, dtype=np.float32)
    if dd.verify:
        sel = np.flatnonzero(est >= dd.threshold - D.verify_margin(dd.threshold, dd.num_perm))
        if len(sel):
            ords = np.unique(np.concatenate([later[sel], earlier[sel]]))
            texts = _gather_text(files, starts, ords)
            sets = {int(o): D.shingles(t, dd.shingle_size) for o, t in zip(ords, texts, strict=True)}
            true[sel] = D.pair_jaccard(sets, later[sel], earlier[sel])
        ok, score = true >= dd.threshold, true
    else:
        ok, score = est >= dd.threshold, est
    idx = np.flatnonzero(ok)
    idx = idx[np.lexsort((earlier[idx], -score[idx], later[idx]))]
    first = idx[np.unique(later[idx], return_index=True)[1]] if len(idx) else idx
    n_verified = int(np.isfinite(true).sum()) if dd.verify else 0
    return (later[first], earlier[first], est[first], true[first], int(len(later)), n_verified, _node())


def _gather_text(files: list[tuple[str, int]], starts: np.ndarray, ordinals: np.ndarray) -> list[str]:
    out: list[str] = []
    for i, (uri, rows) in enumerate(files):
        lo, hi = np.searchsorted(ordinals, [starts[i], starts[i] + rows])
        if hi > lo:
            col = _read_column(uri, "text")
            out.extend(col.take(pa.array(ordinals[lo:hi] - starts[i])).to_pylist())
    return out


def near_duplicates_on_cluster(files: list[tuple[str, int]], alive: np.ndarray, dd: DedupConfig,
                               parts: int | None = None) -> tuple[D.NearDuplicates, ClusterStats]:
    """``dedup.near_duplicates`` over the staged documents with ``alive`` (one bool per ordinal), as Ray tasks.
    Indices of the result are ordinals (not rows of the alive documents)."""
    import ray

    n = int(len(alive))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    parts = parts or max(2, min(64, 2 * cpus))
    starts = np.concatenate([[0], np.cumsum([r for _, r in files])[:-1]]).astype(np.int64)
    # Score tasks own contiguous ordinal ranges, cut at staged-file boundaries.
    n_ranges = max(1, min(parts, len(files)))
    cut = np.linspace(0, len(files), n_ranges + 1).astype(int)
    range_starts = starts[cut[:-1]]
    per_round = max(1, min(dd.bands, _SHUFFLE_BYTES_PER_ROUND // max(1, 24 * int(alive.sum()))))
    rounds = [list(range(b, min(b + per_round, dd.bands))) for b in range(0, dd.bands, per_round)]
    # SPREAD: a shuffle's tasks across the nodes, not piled on the first raylet with a free CPU
    map_task = ray.remote(num_cpus=1, num_returns=parts + 1, scheduling_strategy="SPREAD")(_map)
    reduce_task = ray.remote(num_cpus=1, num_returns=n_ranges + 1, scheduling_strategy="SPREAD")(_reduce)
    score_task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_score)
    node_refs: list = []
    pair_refs: list[list] = [[] for _ in range(n_ranges)]
    tasks = 0
    for bands in rounds:
        maps = [map_task.remote(uri, int(starts[i]), alive[starts[i] : starts[i] + rows].tobytes(), bands,
                                dd.bands, parts) for i, (uri, rows) in enumerate(files)]
        node_refs += [m[-1] for m in maps]
        for q in range(parts):
            red = reduce_task.remote(range_starts, *(m[q] for m in maps))
            node_refs.append(red[-1])
            for r in range(n_ranges):
                pair_refs[r].append(red[r])
        tasks += len(maps) + parts
        # One round's shuffle at a time: its map outputs are freed once its reduces are done.
        ray.wait(node_refs[-parts:], num_returns=parts)
        del maps
    scores = [score_task.remote(files, dd.model_dump_json(), *pair_refs[r]) for r in range(n_ranges)]
    tasks += len(scores)
    dropped = np.zeros(n, dtype=bool)
    match = np.full(n, -1, dtype=np.int64)
    estimated = np.full(n, np.nan, dtype=np.float32)
    verified = np.full(n, np.nan, dtype=np.float32)
    candidates = n_verified = 0
    nodes = set(ray.get(node_refs))
    for later, earlier, est, true, n_pairs, n_ver, node in ray.get(scores):
        dropped[later], match[later], estimated[later], verified[later] = True, earlier, est, true
        candidates, n_verified = candidates + n_pairs, n_verified + n_ver
        nodes.add(node)
    result = D.NearDuplicates(dropped, match, estimated, verified, candidates, n_verified)
    return result, ClusterStats(tasks=tasks, nodes=len(nodes), rounds=len(rounds))
