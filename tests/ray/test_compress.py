"""The compression job end to end on a local Ray, with the real evaluation job behind the gate:

- a faithful INT8 quantization passes and is published as ``runs/<name>/final`` (a complete export whose
  report holds the table), and r1ray's HF engine serves it;
- a model whose weights were zeroed is refused by the gate on both accuracy and perplexity;
- a refused run leaves the published model untouched (nothing reaches ``final``), writes its report under
  ``rejected/`` and leaves no staged candidate behind.

The model is a tiny Llama trained in seconds on a word cycle (tests/unit/test_compress_fixtures.py):
accuracy = exact match of the next four words, perplexity on the training text.
"""

from __future__ import annotations

import json
import shutil

import pytest

from r1ray.compress.config import CompressConfig
from tests.unit.test_compress_fixtures import cycle_text, trained_dir, write_eval_files

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    model = trained_dir(tmp_path_factory, tiny_tokenizer_dir)
    ppl, ref = write_eval_files(tmp_path_factory.mktemp("evalfiles"))
    root = tmp_path_factory.mktemp("storage")
    return model, ppl, ref, root


def _cfg(setup, **overrides) -> CompressConfig:
    model, ppl, ref, root = setup
    data = {
        "model": str(model), "run_name": "tiny-int8", "storage": {"root": str(root)},
        "ray": {"include_dashboard": False},
        "gguf": {"types": ["f16"], "prompts": [cycle_text(0, 5), cycle_text(9, 3)], "max_tokens": 6},
        "eval": {"perplexity": {"files": [str(ppl)], "max_rows": 12},
                 "tasks": {"enabled": False},
                 "reference": {"path": str(ref), "max_tokens": 4, "max_items": 12},
                 "engine": {"num_engines": 1, "cpus_per_engine": 1, "unit_size": 12}},
        "gate": {"accuracy_metric": "reference/exact_match", "max_accuracy_drop_points": 10.0,
                 "max_perplexity_increase_pct": 5.0},
        "report": {"batch_sizes": [1, 4], "new_tokens": 6, "repeats": 1},
    }
    for k, v in overrides.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return CompressConfig.model_validate(data)


def test_faithful_int8_is_published_and_served_then_a_refusal_leaves_it(setup):
    from r1ray.artifacts import read_bytes, read_manifest
    from r1ray.compress.run import REPORT_JSON, REPORT_MD, run
    from r1ray.infer import SamplingParams, make_engine
    from r1ray.model.export import export_is_complete, resolve_export

    res = run(_cfg(setup))
    assert res.passed, res.reasons
    final = res.export_path
    assert final.endswith("/runs/tiny-int8/final") and export_is_complete(final)
    assert resolve_export(res.run_dir) == final  # what serve run_name=tiny-int8 picks up
    m = read_manifest(final, stage="compress")
    assert m["gate"]["passed"] and m["source_model"] == str(setup[0])
    report = json.loads(read_bytes(f"{final}/{REPORT_JSON}"))
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"base", "compressed", "gguf f16"}
    assert rows["compressed"]["size_bytes"] < rows["base"]["size_bytes"]
    assert rows["base"]["accuracy"] >= 0.9 and rows["compressed"]["accuracy"] >= 0.9
    assert set(rows["base"]["decode_tokens_per_s"]) == {"1", "4"} and rows["base"]["p50_latency_s"] > 0
    assert "| compressed | INT8 dynamic (torch x86)" in read_bytes(f"{final}/{REPORT_MD}").decode()
    assert (report["gguf"][0].get("greedy_match") == 1.0) or ("skipped" in report["gguf"][0])

    eng = make_engine(final, backend="hf", device="cpu")
    try:
        [c] = eng.generate([cycle_text(4, 6)], SamplingParams(max_tokens=4, temperature=0))
    finally:
        eng.shutdown()
    assert c.text.strip() == cycle_text(10, 4)

    # a destructive compression (strict limits, half the heads and most MLP channels gone) is refused
    before = read_bytes(f"{final}/manifest.json")
    bad = run(_cfg(setup, quantize={"method": "none"}, gguf={"types": []},
                   prune={"enabled": True, "heads_fraction": 0.5, "head_unit": "kv_group", "mlp_fraction": 0.9,
                          "score": "magnitude"},
                   gate={"max_accuracy_drop_points": 0.0, "max_perplexity_increase_pct": 0.0}))
    assert not bad.passed and bad.export_path is None
    assert any("perplexity rose" in r for r in bad.reasons)
    assert read_bytes(f"{final}/manifest.json") == before  # the served model is untouched
    assert "/runs/tiny-int8/rejected/" in bad.report_dir
    rejected = json.loads(read_bytes(f"{bad.report_dir}/{REPORT_JSON}"))
    assert not rejected["gate"]["passed"] and rejected["gate"]["reasons"] == bad.reasons
    from pathlib import Path

    assert not list(Path(res.run_dir).glob("candidate-*"))  # staged candidates are cleaned up


def test_gate_refuses_zeroed_weights(setup, tmp_path):
    import torch

    from r1ray.compress.gate import decide, evaluate_pair
    from r1ray.model.build import load_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    model = load_model(setup[0])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    save_model(model, load_tokenizer(setup[0]), tmp_path / "zeroed")
    shutil.rmtree(tmp_path / "zeroed" / "gguf", ignore_errors=True)
    cfg = _cfg(setup, run_name="tiny-zeroed")
    base, comp, ev = evaluate_pair(str(setup[0]), str(tmp_path / "zeroed"), cfg)
    verdict = decide(base, comp, cfg.gate)
    assert base.accuracy >= 0.9 and comp.accuracy == 0.0
    assert comp.perplexity > 10 * base.perplexity
    assert not verdict.passed and len(verdict.reasons) == 2, verdict.reasons
