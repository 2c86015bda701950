"""Streaming with bounded memory: a corpus ~3x larger than Ray's object store passes through the stage.

Ray is started here with the smallest object store Ray accepts (75 MiB) and 2 CPUs; the corpus is
~230 MB of jsonl. Near-dedup, quality filters and PII are off and the tokenizer is a word-level one so
that the test spends its time moving data, which is what it is about.
"""

from __future__ import annotations

import json
import resource

import numpy as np
import pytest

from r1ray.artifacts import read_manifest
from r1ray.data.config import PrepareDataConfig

OBJECT_STORE = 78_643_200
N_DOCS, DOC_CHARS = 23_000, 10_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_store_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False,
             logging_level="WARNING", configure_logging=False)
    yield ray
    ray.shutdown()


def _word_tokenizer(out_dir, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from r1ray.model.tokenizer import BOS, EOS, IM_END, IM_START, PAD, REASONING_TOKENS

    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, IM_START, IM_END, "[UNK]", *REASONING_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token="[UNK]")
    fast.save_pretrained(str(out_dir))


def test_corpus_larger_than_object_store_streams_through(small_store_ray, tmp_path):
    from r1ray.data.pipeline import run

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2000)]
    pool = " ".join(np.array(words)[rng.integers(0, len(words), 3_000_000)])
    src = tmp_path / "big"
    src.mkdir()
    starts = rng.integers(0, len(pool) - DOC_CHARS - 1, N_DOCS)
    per_file = N_DOCS // 8
    for f in range(8):
        with open(src / f"part-{f}.jsonl", "w") as fh:
            for s in starts[f * per_file : (f + 1) * per_file]:
                fh.write(json.dumps({"text": pool[s : s + DOC_CHARS]}) + "\n")
    corpus_bytes = sum(p.stat().st_size for p in src.iterdir())
    assert corpus_bytes > 2.9 * OBJECT_STORE
    _word_tokenizer(tmp_path / "tok", words)
    cfg = PrepareDataConfig.model_validate({
        "run_name": "big", "storage": {"root": str(tmp_path / "out")},
        "sources": [{"name": "big", "path": str(src), "quality_filters": False}],
        "clean": {"pii": {"enabled": False}},
        "dedup": {"near": False},
        "tokenizer": {"path": str(tmp_path / "tok")},
        "pack": {"seq_len": 1024, "validation_fraction": 0.01, "max_shard_bytes": 8 << 20},
        "batch_size": 256,
    })
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = read_manifest(run(cfg))
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    c = m["counts"]
    print(json.dumps(m["timings_s"]))
    print(f"corpus {corpus_bytes / 1e6:.0f} MB through a {OBJECT_STORE / 2**20:.0f} MiB object store in "
          f"{m['timings_s']['total_s']:.0f}s; driver peak RSS grew {growth / 1e6:.0f} MB; counts {c['read']} read")
    assert c["read"] == N_DOCS - N_DOCS % 8
    per = c["per_source"]["big"]
    assert per["read"] == per["kept"] + per["duplicate_exact"]
    assert c["train_tokens"] + c["validation_tokens"] + c["tail_tokens_dropped"] > 0.9 * corpus_bytes / 6
    # The driver never holds the corpus: it keeps ~50 bytes of keys per document and a few bounded buffers
    # (a staged file of <= 8 MB of text, one shard, Ray's prefetched blocks, allocator caches).
    assert growth < corpus_bytes
