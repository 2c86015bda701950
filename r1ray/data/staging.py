"""Staged text and rejects of the data stage's clean pass: rolling Parquet files written by the driver.

The staged files (``<artifact>/_work/clean``) hold every document that survived cleaning, in corpus order;
a document's *ordinal* is its row number across them. Dedup verification, the duplicates audit, the
tokenizer sample and the tokenize pass all read them back by ordinal.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r1ray.artifacts import filesystem, join, write_bytes_atomic

# A staged file holds at most this many documents or bytes of text: the unit of tokenizing work, and a
# bound on what the driver buffers.
STAGE_ROWS, STAGE_BYTES = 4096, 2 << 20


class Staging:
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
            if self._rows >= STAGE_ROWS or self._bytes >= STAGE_BYTES:
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


class Rejects:
    """The rejects/ dataset: every bad row or file with its source, path, position, part and reason."""

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


def read_staged(staging: Staging, ordinals: np.ndarray, column: str) -> list:
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
