"""The continuous-batching engine, in-process (no Ray): parity with transformers' generate, per-sequence
sampling, stop strings, logprobs, limits, cancellation, a poisoned sequence failing alone, and the vLLM
slot's fallback.

The engine is placed on CPU in float32 explicitly, so these tests check the same numbers on a GPU machine."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from r1ray.infer import EngineFullError, SamplingParams, make_engine
from r1ray.infer.hf import HFEngine

PROMPTS = ["the a of", "she was at the house and", "1 + 2 =", "we"]


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    import torch

    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="debug", max_position_embeddings=256), tok, seed=1)
    # wide random weights: an untrained tiny model at the usual init std repeats one token forever, and the
    # fault-isolation tests need prompts whose outputs differ and vary
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=g)
    return save_model(model, tok, tmp_path_factory.mktemp("engine") / "debug-llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", max_batch_size=4, max_queue=8,
                            batch_wait_timeout_s=0.01)
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


def test_parameters_the_engine_cannot_represent_are_refused_at_submit(engine):
    ids = engine.encode("the")
    for params, needle in [
        (SamplingParams(seed=2**64), "seed must be an integer in [-2**63, 2**64 - 1]"),
        (SamplingParams(seed=-(2**63) - 1), "seed"),
        (SamplingParams(temperature=float("nan")), "temperature must be a finite number"),
        (SamplingParams(temperature=float("inf")), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(max_tokens=-1), "max_tokens"),
        (SamplingParams(logprobs=10**9), "logprobs"),
        (SamplingParams(stop=("",)), "stop"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            engine.submit(ids, params, lambda ev: None)
    with pytest.raises(ValueError, match=r"token id 99999 is outside the vocabulary \[0, "):
        engine.submit([1, 99999], greedy(2), lambda ev: None)
    assert engine.load()["pending"] == 0
    # The extremes that are representable work (seed at both ends of torch's range).
    for seed in (2**64 - 1, -(2**63)):
        out = engine.generate(["the"], SamplingParams(max_tokens=3, seed=seed, ignore_eos=True))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_max_tokens_zero_scores_the_prompt_only(engine):
    [out] = engine.generate(["the a of"], SamplingParams(max_tokens=0, logprobs=2, prompt_logprobs=True))
    ref = engine.generate(["the a of"], greedy(1, logprobs=2, prompt_logprobs=True))[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
    assert [e.logprob for e in out.prompt_logprobs] == [e.logprob for e in ref.prompt_logprobs]
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) and out.prompt_logprobs[0].logprob is None


class _Poison:
    """Fault injection: the embedding raises whenever its input holds ``token`` (a real forward failing)."""

    def __init__(self, engine, token: int):
        self.token = token
        self.calls = 0
        self.handle = engine.model.get_input_embeddings().register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        if bool((args[0] == self.token).any()):
            raise RuntimeError(f"poisoned token {self.token}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _unused_token(engine, used: set[int]) -> int:
    return next(t for t in range(20, engine.vocab_size) if t not in used and engine.tokenizer.decode([t]).strip())


def test_a_poisoned_prefill_fails_only_its_sequence(engine):
    alone = [engine.generate([p], greedy(8))[0].token_ids for p in PROMPTS]
    used = {t for p in PROMPTS for t in engine.encode(p)} | {t for a in alone for t in a}
    poison = _unused_token(engine, used)
    prompts = [engine.encode(PROMPTS[0]), engine.encode("the a of") + [poison], *map(engine.encode, PROMPTS[1:])]
    with _Poison(engine, poison) as hook:
        outs = engine.generate(prompts, greedy(8))  # the first four share one prefill (max_batch_size=4)
    assert hook.calls > 8
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert [o.token_ids for i, o in enumerate(outs) if i != 1] == alone
    assert all(o.finish_reason == "length" for i, o in enumerate(outs) if i != 1)
    assert engine.load()["pending"] == 0


def test_a_sequence_failing_mid_decode_fails_alone(engine):
    alone = [engine.generate([p], greedy(12))[0].token_ids for p in PROMPTS]

    def candidates(victim: int):  # a token only `victim` meets, first generated at its step j >= 2
        others = {t for i, p in enumerate(PROMPTS) if i != victim for t in engine.encode(p) + alone[i]}
        own = engine.encode(PROMPTS[victim])
        return [(victim, j, t) for j, t in enumerate(alone[victim])
                if j >= 2 and t not in others and t not in own + alone[victim][:j]]

    victim, j, poison = next(c for v in range(len(PROMPTS)) for c in candidates(v))
    with _Poison(engine, poison):
        outs = engine.generate(PROMPTS, greedy(12))
    # The victim produced its tokens up to the poisoned one (sampled, then fed back in the failing step).
    assert outs[victim].finish_reason == "error" and outs[victim].token_ids == alone[victim][: j + 1]
    assert [o.token_ids for i, o in enumerate(outs) if i != victim] == [a for i, a in enumerate(alone) if i != victim]
    assert engine.load()["pending"] == 0


def test_a_failing_consumer_fails_only_its_sequence(engine):
    """A sink that raises (e.g. its client's event loop closed) ends its own sequence, not the batch."""
    done = threading.Event()
    events: dict[int, list] = {0: [], 1: [], 2: []}

    def sink(i):
        def f(ev):
            if i == 1 and len(events[1]) == 2:
                events[1].append(ev)
                raise RuntimeError("client gone")
            events[i].append(ev)
            if ev.finish_reason is not None and all(e and e[-1].finish_reason for k, e in events.items() if k != 1):
                done.set()
        return f

    engine.reserve(3)
    for i, p in enumerate(PROMPTS[:3]):
        engine.submit(engine.encode(p), greedy(10), sink(i))
    assert done.wait(30)
    assert [len(events[i]) for i in (0, 2)] == [10, 10]
    assert events[1][-1].finish_reason == "error"
    t0 = time.perf_counter()
    while engine.load()["pending"] and time.perf_counter() - t0 < 5:
        time.sleep(0.01)
    assert engine.load()["pending"] == 0


def test_update_weights_after_failures(engine):
    """GRPO's in-place weight sync still finds the engine idle after failed sequences (no leaked slot)."""
    before = engine.generate(["the a of"], greedy(6))[0].token_ids
    state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    engine.update_weights(state, version=7, timeout_s=10)
    assert engine.weights_version == 7
    assert engine.generate(["the a of"], greedy(6))[0].token_ids == before


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
        make_engine(str(model_dir), backend="vllm", device="cpu", dtype="float32")
    with caplog.at_level(logging.INFO, logger="r1ray"):
        logging.getLogger("r1ray").propagate = True
        eng = make_engine(str(model_dir), backend="auto", device="cpu", dtype="float32")
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
    eng = HFEngine.from_dir(local, device="cpu", dtype="float32")
    try:
        assert len(eng.generate(["the"], greedy(3))[0].token_ids) == 3
    finally:
        eng.shutdown()
