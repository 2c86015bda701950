"""Exactly-once data: the global sample order and the node-local token store behind it.

Order. Sample ``g`` (a global index counted from the start of training, across epochs) is row
``perm(seed, epoch)[g % N]`` of the split, with ``epoch = g // N`` and ``perm`` a seeded permutation.
That is a pure function of (seed, epoch, index): nothing about workers or restarts enters it.

Cursor. Optimizer step ``s`` trains on global samples ``[s*B, (s+1)*B)`` (``B`` = global batch size).
Those ``B`` samples are cut into ``B / micro`` micro-batches; micro-batch ``j`` goes to worker ``j % W`` as
its accumulation step ``j // W``. A checkpoint records ``samples_consumed = s*B``; a resume on any
number of workers ``W'`` continues at that offset, so no sample is skipped or repeated.

Store. Random access into Parquet row groups is slow, so each node copies a split's token ids once into a
memory-mapped ``.npy`` (the Megatron indexed-dataset idea), keyed by the artifact's manifest hash, and
published atomically (concurrent builders on one node race harmlessly).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from r1ray.artifacts import filesystem, manifest_sha256
from r1ray.data.shards import DataArtifact


class GlobalOrder:
    """The permutation of ``n`` rows for each epoch, cached for the current epoch.

    With ``difficulty`` (a score per row, higher = harder), the first ``curriculum_epochs`` epochs go from easy
    to hard: the rows sorted by score are cut into ``buckets`` equal runs, each shuffled by (seed, epoch), the
    easiest run first; later epochs are plain shuffles. Still a pure function of (seed, epoch, index) and of the
    data, so resume stays exactly-once.
    """

    def __init__(self, n: int, seed: int, difficulty: np.ndarray | None = None, curriculum_epochs: int = 0,
                 buckets: int = 16):
        if n <= 0:
            raise ValueError("the training split is empty: nothing to train on")
        if difficulty is not None and len(difficulty) != n:
            raise ValueError(f"difficulty: {len(difficulty)} scores for {n} samples")
        self.n, self.seed = n, seed
        self.curriculum_epochs = curriculum_epochs if difficulty is not None else 0
        self._by_difficulty = (np.argsort(difficulty, kind="stable") if self.curriculum_epochs else None)
        self.buckets = max(1, min(buckets, n))
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def perm(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if epoch < self.curriculum_epochs:
                runs = np.array_split(self._by_difficulty, self.buckets)
                self._perm = np.concatenate([rng.permutation(r) for r in runs])
            else:
                self._perm = rng.permutation(self.n)
            self._epoch = epoch
        return self._perm

    def rows(self, global_indices: np.ndarray) -> np.ndarray:
        """Row of the split for each global sample index."""
        out = np.empty(len(global_indices), dtype=np.int64)
        epochs = global_indices // self.n
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.perm(int(e))[global_indices[sel] % self.n]
        return out


def unigram_surprisal(rows: np.ndarray, vocab: int, chunk: int = 65536) -> np.ndarray:
    """Mean -log p(token) of each row under the rows' own unigram distribution (add-one smoothed): a row of
    common tokens scores low (easy), one of rare tokens high (hard). A pure function of the data."""
    counts = np.zeros(vocab, dtype=np.int64)
    for lo in range(0, len(rows), chunk):
        c = np.bincount(np.asarray(rows[lo : lo + chunk]).reshape(-1), minlength=len(counts))
        if len(c) > len(counts):  # an id past the tokenizer's size (a padded embedding)
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts += c
    surprisal = -np.log((counts + 1.0) / (counts.sum() + len(counts)))
    return np.concatenate([surprisal[np.asarray(rows[lo : lo + chunk])].mean(axis=1)
                           for lo in range(0, len(rows), chunk)]) if len(rows) else np.zeros(0)


def step_micro_batches(
    step: int, global_batch: int, micro: int, rank: int, world: int
) -> list[np.ndarray]:
    """Global sample indices of each of this worker's micro-batches for optimizer step ``step``."""
    base = step * global_batch
    n_micro = global_batch // micro
    return [
        np.arange(base + j * micro, base + (j + 1) * micro, dtype=np.int64)
        for j in range(rank, n_micro, world)
    ]


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("R1RAY_CACHE") or Path.home() / ".cache" / "r1ray").expanduser()


def token_store(data: DataArtifact, split: str, cache_dir: str | None = None) -> np.ndarray:
    """The split's rows as a read-only ``(rows, seq_len)`` int32 memmap, built on first use."""
    key = manifest_sha256(data.uri)[:16]
    path = cache_root(cache_dir) / "tokens" / key / f"{split}.npy"
    rows = data.rows(split)
    if path.exists():
        arr = np.load(path, mmap_mode="r")
        if arr.shape == (rows, data.seq_len):
            return arr
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(rows, data.seq_len))
    import pyarrow.parquet as pq

    at = 0
    for uri in data.shard_uris(split):
        fs, p = filesystem(uri)
        with fs.open_input_file(p) as f:
            table = pq.read_table(f, columns=["input_ids"])
        col = table.column("input_ids").combine_chunks()
        values = col.values.to_numpy(zero_copy_only=False)
        n = len(col)
        if len(values) != n * data.seq_len:
            raise ValueError(
                f"{uri}: rows must hold exactly seq_len={data.seq_len} token ids (found {len(values)} ids in "
                f"{n} rows); the data artifact is corrupt, rebuild it with jobs/prepare_data.py"
            )
        if at + n > rows:
            raise ValueError(f"{uri}: more rows than the manifest of {data.uri} lists ({rows})")
        out[at : at + n] = values.reshape(n, data.seq_len)
        at += n
    if at != rows:
        raise ValueError(f"{data.uri} split {split}: manifest lists {rows} rows, shards hold {at}")
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")
