"""The packed-shard format: the contract between the data stage and every training stage.

A data artifact directory holds::

    manifest.json                stage "data"; see DataArtifact for the keys training reads
    tokenizer/                   AutoTokenizer.from_pretrained loads it
    train/shard-00000.parquet    rows of exactly `seq_len` token ids (column `input_ids`, list<int32>)
    validation/shard-00000.parquet
    test/shard-00000.parquet     held out (``pack.test_fraction``; no shards when 0)
    rejects/                     malformed rows/files with source, position and reason
    duplicates/                  every removed duplicate, what it matched and the document kept

Rows are packed documents (each followed by EOS) cut into fixed-length sequences. Training reads
sample ``i`` of a split as row ``i`` of the concatenated shards, in manifest order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from r1ray.artifacts import join, read_manifest

SHARD_SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()), nullable=False)])
SPLITS = ("train", "validation", "test")  # the split codes of the pack pass are indices into this


@dataclass(frozen=True)
class ShardInfo:
    path: str
    """Relative to the artifact directory."""
    rows: int
    sha256: str


@dataclass(frozen=True)
class DataArtifact:
    uri: str
    seq_len: int
    tokenizer_dir: str
    splits: dict[str, tuple[ShardInfo, ...]]
    manifest: dict[str, Any]

    @classmethod
    def load(cls, uri: str) -> DataArtifact:
        m = read_manifest(uri, stage="data")
        splits = {
            name: tuple(ShardInfo(**s) for s in m["splits"][name]["shards"]) for name in m["splits"]
        }
        return cls(
            uri=uri, seq_len=int(m["seq_len"]), tokenizer_dir=join(uri, m["tokenizer"]["path"]),
            splits=splits, manifest=m,
        )

    def rows(self, split: str) -> int:
        return sum(s.rows for s in self.splits.get(split, ()))

    def shard_uris(self, split: str) -> list[str]:
        return [join(self.uri, s.path) for s in self.splits.get(split, ())]
