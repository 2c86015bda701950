"""The HF serving engine on CUDA: it lands on the GPU, greedy decoding matches transformers' own greedy
``generate`` (fp32, batch 1), batches of fresh prompt lengths finish, and ``on_batch`` sees every step."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def export_dir(tiny_tokenizer_dir, tmp_path_factory):
    from r1ray.model import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    out = tmp_path_factory.mktemp("export")
    save_model(build_model(ModelConfig(preset="tiny"), tok, seed=0), tok, out)
    return out


def test_engine_greedy_matches_transformers_generate_fp32(export_dir):
    from r1ray.infer import SamplingParams
    from r1ray.infer.hf import HFEngine

    eng = HFEngine.from_dir(export_dir, device="cuda", dtype="float32")
    try:
        assert next(eng.model.parameters()).device.type == "cuda"
        ids = eng.encode("the a of to and in is")
        [out] = eng.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        with torch.no_grad():
            ref = eng.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=16, do_sample=False,
                                     min_new_tokens=16, pad_token_id=eng.pad_id)
        assert out.token_ids == ref[0, len(ids):].tolist()
    finally:
        eng.shutdown()


def test_engine_bf16_batch_of_fresh_lengths_and_metrics(export_dir):
    from r1ray.infer import SamplingParams
    from r1ray.infer.hf import HFEngine

    steps: list[tuple[int, int, float]] = []
    eng = HFEngine.from_dir(export_dir, device="cuda", dtype="auto", max_batch_size=32,
                            on_batch=lambda n, t, s: steps.append((n, t, s)))
    try:
        assert next(eng.model.parameters()).dtype == torch.bfloat16  # auto on CUDA
        words = "the a of to and in is it that for on with as was he she they we you at by".split()
        prompts = [" ".join(words[: 3 + i]) for i in range(16)]  # 16 different prompt lengths
        outs = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        assert [len(o.token_ids) for o in outs] == [24] * 16
        assert all(o.finish_reason == "length" for o in outs)
        assert sum(t for _, t, _ in steps) == 16 * 24
        assert max(n for n, _, _ in steps) > 1  # batched
    finally:
        eng.shutdown()
