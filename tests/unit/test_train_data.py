"""The exactly-once sample order, the token store, and finding/publishing exports (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r1ray.train.core.sampler import GlobalOrder, step_micro_batches


def test_order_is_a_pure_function_of_seed_epoch_index():
    a, b = GlobalOrder(50, seed=3), GlobalOrder(50, seed=3)
    idx = np.arange(0, 170)
    rows = a.rows(idx)
    assert np.array_equal(rows, b.rows(idx[::-1])[::-1])  # order of asking does not matter
    for e in range(3):  # each epoch is a permutation of every row
        assert sorted(rows[e * 50 : (e + 1) * 50]) == list(range(50))
    assert not np.array_equal(rows[:50], rows[50:100])  # epochs reshuffle
    assert not np.array_equal(rows[:50], GlobalOrder(50, seed=4).rows(np.arange(50)))


def test_difficulty_curriculum_goes_easy_to_hard_then_shuffles_and_stays_a_pure_function():
    from r1ray.train.core.sampler import unigram_surprisal

    rng = np.random.default_rng(0)
    # 200 rows of 16 tokens: row i draws from the i-th slice of a Zipf-ordered vocabulary, so rows differ in
    # how common their tokens are.
    vocab = 400
    rows = np.stack([rng.integers(i, i + 200, size=16) for i in range(200)]).astype(np.int32)
    score = unigram_surprisal(rows, vocab)
    counts = np.bincount(rows.reshape(-1), minlength=vocab)
    expect = -np.log((counts + 1.0) / (counts.sum() + vocab))[rows].mean(axis=1)
    assert np.allclose(score, expect)  # mean -log p of each row's tokens, add-one smoothed
    a, b = GlobalOrder(200, 7, score, curriculum_epochs=1, buckets=4), GlobalOrder(200, 7, score, 1, 4)
    idx = np.arange(0, 600)
    got = a.rows(idx)
    assert np.array_equal(got, b.rows(idx[::-1])[::-1])  # a pure function: resume is exactly-once
    first = got[:200]
    assert sorted(first) == list(range(200))  # epoch 0 is still a permutation
    quarters = [score[first[q * 50 : (q + 1) * 50]] for q in range(4)]
    assert all(quarters[q].max() <= quarters[q + 1].min() for q in range(3))  # easy runs first
    assert not np.array_equal(first[:50], np.sort(first[:50]))  # each run shuffled
    plain = GlobalOrder(200, 7).rows(idx)
    assert np.array_equal(got[200:], plain[200:])  # epoch 1 on: the plain shuffle
    assert np.array_equal(GlobalOrder(200, 7, score, curriculum_epochs=0).rows(idx), plain)
    # ids past the given vocabulary (a padded embedding) are counted, not an error
    assert unigram_surprisal(np.array([[1, 2, 500]]), 10).shape == (1,)


def test_curriculum_epochs_on_a_stage_without_scores_fails_before_any_compute():
    from r1ray.config import load_config
    from r1ray.train.core.driver import run_stage
    from r1ray.train.stages.sft import SFTConfig, SFTStage

    cfg = load_config(SFTConfig, ["train.curriculum_epochs=1"])
    with pytest.raises(ValueError, match="train.curriculum_epochs=1: the sft stage has no difficulty score"):
        run_stage(SFTStage, cfg)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_world_size_trains_the_same_samples_per_step(world):
    gbs, micro = 16, 2
    for step in (0, 5):
        got = sorted(i for r in range(world) for mb in step_micro_batches(step, gbs, micro, r, world) for i in mb)
        assert got == list(range(step * gbs, (step + 1) * gbs))
        per_rank = [len(step_micro_batches(step, gbs, micro, r, world)) for r in range(world)]
        assert per_rank == [gbs // (micro * world)] * world


def test_resume_at_another_world_size_is_exactly_once():
    """Steps 0-2 on 2 workers then 3-5 on 1 worker cover samples [0, 6*B) once each."""
    gbs, micro = 8, 2
    seen = []
    for step in range(6):
        world = 2 if step < 3 else 1
        for r in range(world):
            for mb in step_micro_batches(step, gbs, micro, r, world):
                seen.extend(mb.tolist())
    assert sorted(seen) == list(range(6 * gbs))


def test_token_store_matches_parquet(tiny_tokenizer_dir, tmp_path):
    import pyarrow.parquet as pq

    from r1ray.data.shards import DataArtifact
    from r1ray.data.synthetic_shards import write_data_artifact
    from r1ray.train.core.sampler import token_store

    data = DataArtifact.load(write_data_artifact(tmp_path / "d", tiny_tokenizer_dir, seq_len=16, train_docs=100,
                                                 val_docs=10, rows_per_shard=20))
    assert len(data.splits["train"]) > 1
    store = token_store(data, "train", str(tmp_path / "cache"))
    direct = np.concatenate([np.array(pq.read_table(u)["input_ids"].to_pylist()) for u in data.shard_uris("train")])
    assert store.shape == (data.rows("train"), 16) and np.array_equal(store, direct)
    again = token_store(data, "train", str(tmp_path / "cache"))  # cached: same file, no rebuild
    assert again.filename == store.filename


def test_token_store_rejects_a_manifest_that_lies(tiny_tokenizer_dir, tmp_path):
    from r1ray.data.shards import DataArtifact
    from r1ray.data.synthetic_shards import write_data_artifact
    from r1ray.train.core.sampler import token_store

    d = Path(write_data_artifact(tmp_path / "d", tiny_tokenizer_dir, seq_len=16, train_docs=40, val_docs=5))
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["rows"] += 3
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="manifest lists"):
        token_store(DataArtifact.load(str(d)), "train", str(tmp_path / "cache"))


def _fake_export(path: Path, *, weights: bytes = b"w" * 10) -> None:
    from r1ray.train.core.checkpoint import write_export_manifest

    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text("{}")
    write_export_manifest(str(path), stage="pretrain", config={}, inputs=[])


def test_newest_export_prefers_final_then_newest_complete_checkpoint(tmp_path):
    from r1ray.train.core.checkpoint import COMPLETE, newest_checkpoint, newest_export, publish_final

    run = tmp_path / "runs" / "r"
    assert newest_export(str(run)) is None
    for step in (4, 8, 12):
        ck = run / f"checkpoint_{step:08d}-abcd1234"
        _fake_export(ck / "hf")
        (ck / "trainer_state.json").write_text("{}")
        if step != 12:  # step 12 was cut off before it was registered
            (ck / COMPLETE).write_text("{}")
    (run / "checkpoint_00000008-abcd1234" / "hf" / "model.safetensors").write_bytes(b"short")  # torn write
    assert newest_export(str(run)) == str(run / "checkpoint_00000004-abcd1234" / "hf")
    assert newest_checkpoint(str(run)) == str(run / "checkpoint_00000008-abcd1234")
    final = publish_final(str(run), str(run / "checkpoint_00000004-abcd1234" / "hf"), stage="pretrain",
                          config={}, inputs=[])
    assert newest_export(str(run)) == final == str(run / "final")
    # republishing swaps the whole directory
    publish_final(str(run), str(run / "checkpoint_00000004-abcd1234" / "hf"), stage="pretrain", config={},
                  inputs=[])
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("final")) == ["final"]


def test_a_stage_that_cannot_build_batches_fails_before_any_compute():
    from r1ray.config import load_config
    from r1ray.train.core.driver import run_stage
    from r1ray.train.stage import Stage
    from r1ray.train.stages.sft import SFTConfig

    class NoBatches(Stage):
        name = "nobatches"
        config_class = SFTConfig

        def build_model(self):
            raise AssertionError("never reached")

        def num_samples(self):
            return 1

        def loss(self, model, batch, metrics):
            raise AssertionError("never reached")

    with pytest.raises(TypeError, match="NoBatches implements neither make_batch nor step_inputs"):
        run_stage(NoBatches, load_config(SFTConfig, []))
