"""INT8 export: safetensors only, reloaded as INT8 modules by plain ``from_pretrained`` (so r1ray's loader, the
HF engine and Serve need nothing special), faithful to the fp32 model, and served by r1ray's ``HFEngine``.
FP8 runs only on a GPU of compute capability >= 8.9."""

from __future__ import annotations

import json

import pytest
import torch

from r1ray.compress.quantize import fp8_supported, quantize_dir
from tests.unit.test_compress_fixtures import cycle_text, trained_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir):
    return trained_dir(tmp_path_factory, tiny_tokenizer_dir)


def _faithful(trained, q) -> None:
    from r1ray.model.build import load_model
    from r1ray.model.tokenizer import load_tokenizer

    base = load_model(trained).eval()
    tok = load_tokenizer(trained)
    ids = torch.tensor([tok(cycle_text(3, 12), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lb, lq = base(ids).logits, q(ids).logits
    assert ((lq - lb).abs().max() / lb.abs().max()) < 0.05
    assert torch.equal(lq.argmax(-1), lb.argmax(-1))


@pytest.mark.parametrize("output_head", [True, False])
def test_int8_export_is_safetensors_and_reloads_quantized(trained, tmp_path, output_head):
    from transformers import AutoModelForCausalLM

    from r1ray.compress.measure import weights_bytes
    from r1ray.model.build import load_model

    out = quantize_dir(trained, tmp_path / "int8", method="int8", output_head=output_head)
    names = {p.name for p in out.iterdir()}
    assert {"model-r1ray-int8.safetensors", "r1ray_quantization.json", "tokenizer.json", "config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # never pickle
    desc = json.loads((out / "r1ray_quantization.json").read_text())
    assert ("lm_head" in desc["modules"]) == output_head and "model.layers.1.mlp.down_proj" in desc["modules"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "r1ray-int8-dynamic"
    # plain transformers refuses the directory instead of loading random weights
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out)

    q = load_model(out)  # r1ray's loader (HFEngine, Serve): rebuilds the INT8 modules
    dyn = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(q.model.layers[0].mlp.down_proj, dyn) and isinstance(q.model.layers[1].self_attn.q_proj, dyn)
    assert isinstance(q.lm_head, dyn) == output_head
    assert weights_bytes(out) < weights_bytes(trained) * (0.6 if output_head else 0.7)
    _faithful(trained, q)
    with pytest.raises(ValueError, match="float32"):
        load_model(out, dtype=torch.bfloat16)


def test_int8_torchao_export_keeps_an_untied_head(trained, tmp_path):
    from r1ray.model.build import load_model

    out = quantize_dir(trained, tmp_path / "ao", method="int8_torchao", output_head=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "torchao" and qc["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"
    q = load_model(out).eval()  # plain from_pretrained
    assert type(q.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
    # transformers drops a tied head asked to be quantized from the file (random on reload): the job unties it
    assert type(q.lm_head.weight).__name__ == "Int8Tensor"
    _faithful(trained, q)


def test_hf_engine_serves_the_int8_export(trained, tmp_path):
    from r1ray.infer import SamplingParams, make_engine

    out = quantize_dir(trained, tmp_path / "int8")
    eng = make_engine(str(out), backend="hf", device="cpu")
    try:
        assert isinstance(eng.model.model.layers[0].mlp.up_proj, torch.ao.nn.quantized.dynamic.Linear)
        [c] = eng.generate([cycle_text(0, 6)], SamplingParams(max_tokens=4, temperature=0))
    finally:
        eng.shutdown()
    assert c.text.strip() == cycle_text(6, 4)  # the trained continuation survives INT8


def test_unknown_method_is_refused(trained, tmp_path):
    with pytest.raises(ValueError, match="int8, int8_torchao, fp8"):
        quantize_dir(trained, tmp_path / "x", method="int4")


@pytest.mark.skipif(torch.cuda.is_available() and fp8_supported()[0], reason="this host runs FP8")
def test_fp8_without_a_capable_gpu_names_why(trained, tmp_path):
    with pytest.raises(RuntimeError, match="compute capability|no CUDA GPU"):
        quantize_dir(trained, tmp_path / "fp8", method="fp8", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not fp8_supported()[0], reason=f"FP8 weight-only needs a GPU: {fp8_supported()[1]}")
def test_fp8_weight_only_on_gpu(trained, tmp_path):
    from r1ray.model.build import load_model

    out = quantize_dir(trained, tmp_path / "fp8", method="fp8", device="cuda")
    q = load_model(out, dtype=torch.bfloat16).to("cuda").eval()
    assert type(q.model.layers[0].mlp.down_proj.weight).__name__ == "Float8Tensor"
    base = load_model(trained, dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]], device="cuda")
    with torch.no_grad():
        lb, lq = base(ids).logits.float(), q(ids).logits.float()
    assert ((lq - lb).abs().max() / lb.abs().max()) < 0.1
