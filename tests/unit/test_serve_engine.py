"""The continuous-batching engine, in-process (no Ray): parity with transformers' generate, per-sequence
sampling, stop strings, logprobs, limits, cancellation, and the vLLM slot's fallback."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import torch

from r1ray.infer import EngineFullError, SamplingParams, make_engine
from r1ray.infer.hf import HFEngine

PROMPTS = ["the a of", "she was at the house and", "1 + 2 =", "we"]


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.model.build import ModelConfig, build_model, save_model

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="debug", max_position_embeddings=256), tok, seed=1)
    return save_model(model, tok, tmp_path_factory.mktemp("engine") / "debug-llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = HFEngine.from_dir(model_dir, max_batch_size=4, max_queue=8, batch_wait_timeout_s=0.01)
    yield eng
    eng.shutdown()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def test_greedy_batched_equals_transformers_generate(engine):
    outs = engine.generate(PROMPTS, greedy(16))  # one batch of 4 prompts of different lengths (left padding)
    tok = engine.tokenizer
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        ref = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                    eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist()
        assert out.finish_reason == "length" and len(out.token_ids) == 16


def test_joining_a_running_batch_does_not_change_outputs(engine):
    """Continuous batching: a sequence merged into a running batch (caches re-padded) decodes as if alone."""
    alone = [engine.generate([p], greedy(12))[0].token_ids for p in PROMPTS]
    results: dict[int, list[int]] = {}

    async def run_one(i: int, delay: float) -> None:
        await asyncio.sleep(delay)
        ids = engine.encode(PROMPTS[i])
        results[i] = [t async for ev in engine.stream(ids, greedy(12 if i else 40)) for t in ev.token_ids]

    async def main() -> None:
        await asyncio.gather(*(run_one(i, 0.02 * i) for i in range(len(PROMPTS))))

    asyncio.run(main())
    assert results[0][:12] == alone[0]
    assert [results[i] for i in range(1, 4)] == alone[1:]


def test_sampling_is_per_sequence_and_seeded(engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=3, ignore_eos=True)
    a = engine.generate(["the a of"], p)[0].token_ids
    # Same seed in another batch, next to greedy and other sampled sequences: same tokens.
    mixed = engine.generate(["the a of", "she", "we you"], [p, greedy(5), SamplingParams(max_tokens=7, seed=9)])
    assert mixed[0].token_ids == a
    assert len(mixed[1].token_ids) == 5
    others = {tuple(engine.generate(["the a of"], SamplingParams(max_tokens=12, temperature=1.0, seed=s,
                                                                  ignore_eos=True))[0].token_ids) for s in range(4)}
    assert len(others) > 1
    # top_k=1 and a vanishing top_p are greedy whatever the temperature.
    g = engine.generate(["the a of"], greedy(10))[0].token_ids
    assert engine.generate(["the a of"], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=1,
                                                        ignore_eos=True))[0].token_ids == g
    assert engine.generate(["the a of"], SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, seed=1,
                                                        ignore_eos=True))[0].token_ids == g


def test_stop_string_cuts_text(engine):
    full = engine.generate(["the a of"], greedy(24))[0]
    stop = full.text[6:9]
    out = engine.generate(["the a of"], greedy(24, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert len(out.token_ids) < 24


def test_logprobs_match_a_full_forward(engine):
    out = engine.generate(["the a of"], greedy(6, logprobs=3, prompt_logprobs=True))[0]
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), -1)
    n = len(out.prompt_token_ids)
    for j, entry in enumerate(out.logprobs):
        assert entry.token_id == ids[n + j]
        assert entry.logprob == pytest.approx(float(logp[n + j - 1, ids[n + j]]), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0][2] == pytest.approx(entry.logprob, abs=1e-5)  # greedy = top-1
    assert out.prompt_logprobs[0].logprob is None and len(out.prompt_logprobs) == n
    for j in range(1, n):
        assert out.prompt_logprobs[j].logprob == pytest.approx(float(logp[j - 1, ids[j]]), abs=1e-4)


def test_limits(engine):
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        engine.generate(["the"], greedy(300))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([[]], greedy(3))
    with pytest.raises(EngineFullError, match="engine full"):
        engine.reserve(9)
    assert engine.load()["pending"] == 0


def test_cancelled_stream_frees_its_slot(engine):
    async def main() -> tuple[int, float]:
        seen = 0
        gen = engine.stream(engine.encode("the"), greedy(200))
        async for _ in gen:
            seen += 1
            if seen == 3:
                break
        await gen.aclose()
        t0 = time.perf_counter()
        while engine.load()["pending"] and time.perf_counter() - t0 < 5:
            await asyncio.sleep(0.01)
        return engine.load()["pending"], time.perf_counter() - t0

    pending, waited = asyncio.run(main())
    assert pending == 0 and waited < 2.0


def test_vllm_slot_falls_back_or_fails_clearly(model_dir, caplog):
    pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: vLLM may really be usable here")
    with pytest.raises(RuntimeError, match="engine.backend=vllm but no CUDA device"):
        make_engine(str(model_dir), backend="vllm")
    with caplog.at_level(logging.INFO, logger="r1ray"):
        logging.getLogger("r1ray").propagate = True
        eng = make_engine(str(model_dir), backend="auto")
    assert eng.backend == "hf"
    assert "vLLM engine skipped (no CUDA device)" in caplog.text


def test_object_store_model_is_copied_locally_once(model_dir, tmp_path):
    from r1ray.model.export import localize_model

    assert localize_model(str(model_dir)) == str(model_dir)
    uri = f"file://{model_dir}"
    assert localize_model(uri) == str(model_dir)  # file:// is local
    import fsspec

    mem = fsspec.filesystem("memory")
    for f in Path(model_dir).iterdir():
        mem.pipe(f"/export/{f.name}", f.read_bytes())
    local = localize_model("memory://export", cache_dir=tmp_path)
    assert (Path(local) / "config.json").is_file() and (Path(local) / "model.safetensors").is_file()
    mem.rm("/export", recursive=True)
    assert localize_model("memory://export", cache_dir=tmp_path) == local  # complete copy reused
    eng = HFEngine.from_dir(local)
    assert len(eng.generate(["the"], greedy(3))[0].token_ids) == 3
