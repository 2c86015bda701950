"""The engine pool on a real local Ray: results independent of the pool's size and of faults (an engine
SIGKILLed mid-generate is replaced and its unit regenerated identically), weights pushed in place with a
version check, resize both ways."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from r1ray.infer.types import SamplingParams

RAY_NUM_CPUS = 3

PROMPTS = ["the a of", "she was at the house and", "1 + 2 =", "we", "they were", "it is", "on the", "by"]


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="debug", max_position_embeddings=256), tok, seed=1)
    return str(save_model(model, tok, tmp_path_factory.mktemp("pool") / "debug-llama"))


@pytest.fixture(scope="module")
def pool(ray_local, model_dir):
    from r1ray.infer.pool import EnginePool

    p = EnginePool.start("test-pool", model_dir, n=2, cpus_per_engine=1, device="cpu", dtype="float32")
    yield p
    p.stop()


def sampled(n: int = 24) -> list[SamplingParams]:
    # seeded sampling: the same seed must give the same tokens wherever and whenever the unit runs
    return [SamplingParams(max_tokens=n, temperature=1.0, seed=100 + i, ignore_eos=True) for i in range(len(PROMPTS))]


def tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def test_connect_by_name_and_results_independent_of_pool_size(pool, model_dir):
    from r1ray.infer.hf import HFEngine
    from r1ray.infer.pool import EnginePool

    other = EnginePool.connect("test-pool")
    two = tokens(other.generate(PROMPTS, sampled(), unit_size=4))
    assert all(len(t) == 24 for t in two) and len({tuple(t) for t in two}) == len(PROMPTS)
    # a unit is generated alone as one batch: the same unit in-process on a plain engine gives the same tokens
    eng = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", max_batch_size=4, batch_wait_timeout_s=1.0)
    try:
        local = [t for i in (0, 4) for t in tokens(eng.generate(PROMPTS[i:i + 4], sampled()[i:i + 4]))]
    finally:
        eng.shutdown()
    assert local == two
    assert pool.resize(1) == 1
    try:
        assert tokens(pool.generate(PROMPTS, sampled(), unit_size=4)) == two
    finally:
        assert pool.resize(2) == 2
    assert tokens(pool.generate(PROMPTS, sampled(), unit_size=4)) == two
    # units of another size in between (GRPO's refills, evaluation) leave a unit's result unchanged
    pool.generate(PROMPTS[:2], sampled()[:2], unit_size=1)
    assert tokens(pool.generate(PROMPTS, sampled(), unit_size=4)) == two
    with pytest.raises(ValueError, match="unit_size"):
        pool.generate(PROMPTS, sampled(), unit_size=0)


def test_engine_sigkilled_mid_generate_is_replaced_and_results_unchanged(pool):
    import ray

    params = sampled(160)
    before = tokens(pool.generate(PROMPTS, params, unit_size=2))
    replaced = pool.stats()["replacements"]
    pids = [ray.get(a.pid.remote()) for a in pool.actors()]
    out: dict[str, object] = {}

    def run() -> None:
        out["tokens"] = tokens(pool.generate(PROMPTS, params, unit_size=2))

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 60
    while pool.stats()["in_flight"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the units are decoding now
    assert t.is_alive(), "generation ended before the kill: make it longer"
    os.kill(pids[0], signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    assert out["tokens"] == before
    stats = pool.stats()
    assert stats["replacements"] == replaced + 1 and stats["engines"] == 2
    assert pids[0] not in [ray.get(a.pid.remote()) for a in pool.actors()]


def test_update_weights_in_place_with_version(pool, model_dir):
    import torch

    from r1ray.model.build import load_model

    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * len(PROMPTS)
    base = tokens(pool.generate(PROMPTS, params))
    model = load_model(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5, alpha=1.0)
    seconds = pool.update_weights(model.state_dict(), version=7)
    assert seconds > 0 and pool.stats()["version"] == 7
    changed = tokens(pool.generate(PROMPTS, params, version=7))
    assert changed != base
    # a replacement engine loads the newest weights: kill one, ping (health replaces it), same output
    import ray

    os.kill(ray.get(pool.actors()[1].pid.remote()), signal.SIGKILL)
    time.sleep(0.5)
    assert pool.health()["engines"] == 2
    assert tokens(pool.generate(PROMPTS, params, version=7)) == changed
    with pytest.raises(Exception, match="version"):
        pool.generate(PROMPTS, params, version=3)
    # back to the original weights (other tests share the pool)
    pool.update_weights(load_model(model_dir, dtype=torch.float32).state_dict(), version=0)
    assert tokens(pool.generate(PROMPTS, params, version=0)) == base
