"""The vLLM engine (``r1ray.infer.vllm.VLLMEngine``) on a GPU: context length from today's AsyncLLM, stops
(EOS/<|im_end|>, stop strings, ignore_eos), sampled and prompt logprobs, cancellation, batch metrics, and
in-place weight updates. Skipped without CUDA (tests/gpu/conftest.py) or without vLLM installed."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.gpu

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the 'gpu' extra)")


@pytest.fixture(scope="module")
def export_dir(tiny_tokenizer_dir, tmp_path_factory):
    from r1ray.model import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    out = tmp_path_factory.mktemp("export")
    save_model(build_model(ModelConfig(preset="tiny", max_position_embeddings=512), tok, seed=0), tok, out)
    return out


@pytest.fixture(scope="module")
def engine(export_dir):
    from r1ray.infer.vllm import VLLMEngine

    steps: list[tuple[int, int, float]] = []
    eng = VLLMEngine(str(export_dir), max_batch_size=16, gpu_memory_utilization=0.3,
                     on_batch=lambda n, t, s: steps.append((n, t, s)))
    eng.steps = steps
    yield eng
    eng.shutdown()


def test_protocol_and_context_length(engine):
    from r1ray.infer import Engine

    assert isinstance(engine, Engine)
    assert engine.max_model_len == 512  # read from AsyncLLM's model_config, not engine.engine.model_config
    assert engine.tokenizer.eos_token_id in engine.stop_token_ids


def test_generate_lengths_logprobs_and_metrics(engine):
    from r1ray.infer import SamplingParams

    prompts = ["the a of to", "and in is it that for on with"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2,
                                                   prompt_logprobs=True))
    for p, o in zip(prompts, outs, strict=True):
        assert len(o.token_ids) == 10 and o.finish_reason == "length"
        assert len(o.logprobs) == 10 and all(lp.logprob is not None and lp.logprob <= 0 for lp in o.logprobs)
        assert all(len(lp.top) == 2 for lp in o.logprobs)
        n = len(engine.encode(p))
        assert o.prompt_logprobs is not None and len(o.prompt_logprobs) == n
        assert o.prompt_logprobs[0].logprob is None and all(x.logprob <= 0 for x in o.prompt_logprobs[1:])
    again = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]  # greedy is deterministic
    assert engine.steps and sum(t for _, t, _ in engine.steps) >= 20


def test_stop_string_and_seeded_sampling(engine):
    from r1ray.infer import SamplingParams

    [free] = engine.generate(["the a of"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    stop = free.text[3:6]
    if stop.strip():
        [cut] = engine.generate(["the a of"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                              stop=(stop,)))
        assert cut.finish_reason == "stop" and stop not in cut.text
    a = engine.generate(["the"], SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True))
    b = engine.generate(["the"], SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True))
    assert a[0].token_ids == b[0].token_ids


def test_stream_cancel_frees_the_slot(engine):
    from r1ray.infer import SamplingParams

    async def take_two():
        got = []
        agen = engine.stream(engine.encode("the a"), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for ev in agen:
            got.append(ev)
            if len(got) == 2:
                break
        await agen.aclose()
        return got

    assert len(asyncio.run(take_two())) == 2
    assert engine.load()["pending"] == 0


def test_update_weights_in_place(engine, export_dir):
    import torch
    from safetensors.torch import load_file

    from r1ray.infer import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    before = engine.generate(["the a of to"], params)[0].token_ids
    original = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        original.update(load_file(str(f)))
    shifted = {k: v + 0.05 * torch.randn_like(v.float()).to(v.dtype) if v.dim() == 2 else v
               for k, v in original.items()}
    engine.update_weights(shifted, version=1)
    assert engine.weights_version == 1
    changed = engine.generate(["the a of to"], params)[0].token_ids
    engine.update_weights(original, version=2)
    assert engine.generate(["the a of to"], params)[0].token_ids == before
    assert changed != before
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        engine.update_weights({"nope": torch.zeros(1)}, version=3)
    name = next(iter(original))
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights({name: torch.zeros(3, 3)}, version=3)
    assert engine.weights_version == 2
