"""A small, learnable data artifact in the packed-shard format (``r1ray.data.shards``), for tests and
benchmarks that must not depend on the data stage: templated sentences and sums, tokenized with a given
tokenizer, packed with EOS separators into rows of ``seq_len`` ids, written as Parquet with a manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from r1ray.artifacts import sha256_file, write_manifest
from r1ray.data.shards import SHARD_SCHEMA

_WORDS = "the a of to and in is it that for on with as was he she they we you at by".split()


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic documents with learnable structure (word cycles and arithmetic)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(len(_WORDS))
        words = " ".join(_WORDS[(k + j * 3) % len(_WORDS)] for j in range(rng.randrange(8, 24)))
        a, b = rng.randrange(50), rng.randrange(50)
        out.append(f"{words} {a} + {b} = {a + b}.")
    return out


def write_data_artifact(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    seq_len: int = 32,
    train_docs: int = 600,
    val_docs: int = 80,
    rows_per_shard: int = 64,
    seed: int = 0,
) -> str:
    """Write a complete data artifact at ``out_dir``; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1ray.model.tokenizer import load_tokenizer, tokenizer_sha256

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    tok = load_tokenizer(out / "tokenizer")
    texts = synthetic_texts(train_docs + val_docs, seed)
    splits = {}
    tokens_total = {}
    for split, docs in (("train", texts[:train_docs]), ("validation", texts[train_docs:])):
        ids: list[int] = []
        for t in docs:
            ids.extend(tok(t, add_special_tokens=False)["input_ids"])
            ids.append(tok.eos_token_id)
        n_rows = len(ids) // seq_len
        rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_rows)]
        shards = []
        (out / split).mkdir(exist_ok=True)
        for s, start in enumerate(range(0, n_rows, rows_per_shard)):
            rel = f"{split}/shard-{s:05d}.parquet"
            chunk = rows[start : start + rows_per_shard]
            pq.write_table(pa.table({"input_ids": chunk}, schema=SHARD_SCHEMA), out / rel)
            shards.append({"path": rel, "rows": len(chunk), "sha256": sha256_file(str(out / rel))})
        splits[split] = {"shards": shards, "rows": n_rows}
        tokens_total[split] = n_rows * seq_len
    write_manifest(
        str(out), stage="data",
        config={"synthetic": True, "seq_len": seq_len, "train_docs": train_docs, "val_docs": val_docs, "seed": seed},
        counts={"tokens_train": tokens_total["train"], "tokens_validation": tokens_total["validation"]},
        seq_len=seq_len,
        tokenizer={"path": "tokenizer", "sha256": tokenizer_sha256(out / "tokenizer"), "vocab_size": len(tok)},
        splits=splits,
    )
    return str(out)
