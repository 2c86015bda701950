"""The offline default corpus: the debug recipe through the job's own ``run``, and ``ensure_default``."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from r1ray.artifacts import read_manifest
from r1ray.config import StorageConfig, load_config
from r1ray.data.shards import DataArtifact
from tests.helpers import load_job

REPO = Path(__file__).resolve().parents[2]




def _decoded(art: DataArtifact, split: str) -> str:
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(art.tokenizer_dir)
    rows = [r for u in art.shard_uris(split) for r in pq.read_table(u)["input_ids"].to_pylist()]
    return "".join(tok.decode(r) for r in rows)


def test_debug_recipe_through_the_job(ray_local, tmp_path):
    job = load_job("prepare_data")
    cfg = load_config(job.CONFIG, ["--config", str(REPO / "configs/prepare_data/debug.yaml"),
                                   f"storage.root={tmp_path}"])
    uri = job.run(cfg)
    assert uri == str(tmp_path / "data" / "debug")
    art = DataArtifact.load(uri)
    assert art.seq_len == 128 and art.rows("train") > 500 and art.rows("validation") > 10
    per = art.manifest["counts"]["per_source"]
    assert per["reasoning"]["read"] == 2000 and per["python_stdlib"]["kept"] > 10
    text = _decoded(art, "validation")
    assert "<think>" in text and "<answer>" in text and "Question:" in text
    # half the reasoning documents are chat conversations, their ChatML markers the tokenizer's special tokens
    assert "<|im_start|>user\n" in text and "<|im_start|>assistant\n<think>" in text
    assert "def " in _decoded(art, "train")
    assert art.manifest["tokenizer"]["vocab_size"] == 1024 + 4  # BPE vocab + the 4 reasoning tokens


@pytest.mark.slow
def test_ensure_default_prepares_once_then_reuses(ray_local, tmp_path):
    from r1ray.data.pipeline import ensure_default

    storage = StorageConfig(root=str(tmp_path))
    t0 = time.perf_counter()
    uri = ensure_default(storage)
    first = time.perf_counter() - t0
    assert uri == storage.uri("data", "default")
    art = DataArtifact.load(uri)
    assert art.seq_len == 256
    m = art.manifest
    print(f"default corpus prepared in {first:.0f}s: {m['counts']['train_tokens']} train tokens, "
          f"{m['counts']['validation_tokens']} validation tokens, {m['tokenizer']['vocab_size']} vocab")
    assert m["counts"]["train_tokens"] > 1_000_000 and m["counts"]["validation_rows"] >= 50
    t0 = time.perf_counter()
    assert ensure_default(storage) == uri
    assert time.perf_counter() - t0 < 5
    assert read_manifest(uri)["finished_at"] == m["finished_at"]  # reused, not prepared again
