"""Packing: documents (each followed by EOS) concatenated and cut into ``seq_len`` rows, written as shards.

One ``ShardWriter`` per split, fed in corpus order on the driver, so the same input and seed always give
byte-identical shards. The last partial row of a split is dropped (counted as ``tail_tokens_dropped``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r1ray.artifacts import join, sha256_bytes, write_bytes_atomic
from r1ray.data.shards import SHARD_SCHEMA
from r1ray.observe.metrics import record


def shard_bytes(ids: np.ndarray, seq_len: int) -> pa.Buffer:
    """One Parquet shard of ``ids`` (rows x seq_len int32) in the contract's schema, deterministic bytes."""
    rows = ids.reshape(-1, seq_len)
    flat = pa.array(rows.reshape(-1), type=pa.int32())
    offsets = pa.array(np.arange(0, rows.size + 1, seq_len, dtype=np.int32), type=pa.int32())
    col = pa.ListArray.from_arrays(offsets, flat)
    table = pa.Table.from_arrays([col], schema=SHARD_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, len(rows)), write_statistics=False)
    return sink.getvalue()  # a pa.Buffer (buffer protocol): hashed and written without another copy


class ShardWriter:
    def __init__(self, artifact: str, split: str, seq_len: int, max_shard_bytes: int):
        self.artifact, self.split, self.seq_len = artifact, split, seq_len
        self.rows_per_shard = max(1, max_shard_bytes // (4 * seq_len))
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self.shards: list[dict] = []
        self.tokens = 0
        self.tail_dropped = 0

    def add(self, ids: np.ndarray) -> None:
        self._buf.append(ids)
        self._buffered += len(ids)
        per = self.rows_per_shard * self.seq_len
        while self._buffered >= per:
            flat = np.concatenate(self._buf)
            self._write(flat[:per])
            rest = flat[per:]
            self._buf, self._buffered = ([rest] if len(rest) else []), len(rest)

    def _write(self, ids: np.ndarray) -> None:
        data = shard_bytes(ids.astype(np.int32, copy=False), self.seq_len)
        rel = f"{self.split}/shard-{len(self.shards):05d}.parquet"
        write_bytes_atomic(join(self.artifact, rel), data)
        rows = len(ids) // self.seq_len
        self.shards.append({"path": rel, "rows": rows, "sha256": sha256_bytes(data)})
        self.tokens += len(ids)
        record("r1ray_data_tokens_written", float(len(ids)), split=self.split)

    def close(self) -> None:
        flat = np.concatenate(self._buf) if self._buf else np.zeros(0, dtype=np.int32)
        full = (len(flat) // self.seq_len) * self.seq_len
        if full:
            self._write(flat[:full])
        self.tail_dropped = int(len(flat) - full)
        self._buf, self._buffered = [], 0

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)
