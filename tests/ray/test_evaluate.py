"""The evaluation run on a local Ray: a tiny random Llama evaluated in-process (Ray Data over an engine pool) and
through r1ray's Serve endpoint in one run with ``compare``, so both see the same items: the same per-item greedy
and sampled outputs, the same accuracy, pass@k, maj@k and perplexity (difference 0, CI [0, 0]); the export's
perplexity equals a direct torch computation on the same packed rows; every output file is written. A second
run scores text files and a BLEU/ROUGE reference set.

One module Ray (3 CPUs: the Serve replica, one engine, and Ray Data's tasks), one tiny model, one Serve app.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import free_port, save_tiny_model

RAY_NUM_CPUS = 3
SEQ_LEN = 32




@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("eval") / "tiny-llama", max_positions=1024)


@pytest.fixture(scope="module")
def data_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A minimal data artifact: 13 packed rows of SEQ_LEN tokens in one shard of 3 row groups."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1ray.artifacts import sha256_file, write_manifest
    from r1ray.data.shards import SHARD_SCHEMA
    from r1ray.model.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("data") / "tiny-data"
    shutil.copytree(tiny_tokenizer_dir, out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")
    text = " ".join(f"the {i} and {i + 3} is {2 * i + 3} she was at it." for i in range(60))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows = [ids[i:i + SEQ_LEN] for i in range(0, 13 * SEQ_LEN, SEQ_LEN)]
    assert all(len(r) == SEQ_LEN for r in rows)
    (out / "validation").mkdir()
    pq.write_table(pa.table({"input_ids": rows}, schema=SHARD_SCHEMA), out / "validation" / "shard-00000.parquet",
                   row_group_size=5)
    shard = {"path": "validation/shard-00000.parquet", "rows": len(rows),
             "sha256": sha256_file(str(out / "validation" / "shard-00000.parquet"))}
    write_manifest(str(out), stage="data", config={}, seq_len=SEQ_LEN, tokenizer={"path": "tokenizer"},
                   splits={"validation": {"shards": [shard]}})
    return str(out), rows


@pytest.fixture(scope="module")
def endpoint(ray_local, model_dir):
    from ray import serve

    from r1ray.serve.config import ServeConfig
    from r1ray.serve.launch import deploy

    cfg = ServeConfig.model_validate({
        "model_path": model_dir, "model_name": "tiny", "http": {"port": free_port(19100)},
        "deployment": {"num_cpus": 1}, "engine": {"max_batch_size": 8, "device": "cpu", "dtype": "float32"},
    })
    info = deploy(cfg)
    yield info
    serve.shutdown()


def _cfg(tmp_path, **kw):
    from r1ray.eval.config import EvaluateConfig

    base = {"storage": {"root": str(tmp_path)}, "engine": {"num_engines": 1, "unit_size": 4},
            "bootstrap_resamples": 200, "progress_every_s": 1.0}
    base.update(kw)
    return EvaluateConfig.model_validate(base)


def test_export_and_serve_endpoint_agree_item_by_item(tmp_path, model_dir, data_dir, endpoint):
    import pyarrow.parquet as pq
    import torch

    from r1ray.eval.run import run
    from r1ray.model.build import load_model

    data, rows = data_dir
    cfg = _cfg(
        tmp_path, run_name="parity", model={"path": model_dir, "name": "export"},
        compare={"endpoint": {"url": endpoint.url + "/v1", "model": "tiny"}, "name": "serve"},
        perplexity={"data": data, "max_rows": 12, "batch_rows": 3},
        tasks={"difficulties": [1, 2], "items_per_level": 3, "samples": 2, "k": [1, 2], "max_tokens": 24,
               "prompt_format": "question"},
    )
    res = run(cfg)

    # the same items and the same outputs, greedy and sampled, through both paths
    audit = [json.loads(line) for line in open(f"{res.artifact}/samples.jsonl")]
    by = {}
    for a in audit:
        if a["suite"] == "tasks":
            by.setdefault((a["item"], a["sample"]), {})[a["model"]] = a
    assert len(by) == 6 * 4  # greedy, 2 samples, and greedy with the thinking suppressed (question format: both)
    assert {k[1] for k in by} == {-1, 0, 1, "no_think"}
    for key, pair in by.items():
        assert pair["export"]["prompt"] == pair["serve"]["prompt"], key
        assert pair["export"]["output"] == pair["serve"]["output"], key
        assert pair["export"]["score"] == pair["serve"]["score"]
    assert any(a["output"] for a in audit if a["suite"] == "tasks")  # the model wrote something
    for metric in ("accuracy", "accuracy_no_think", "pass@1", "pass@2", "maj@2"):
        assert res.value(metric, model="export", suite="tasks") == res.value(metric, model="serve", suite="tasks")
    assert res.value("perplexity", model="serve") == pytest.approx(res.value("perplexity", model="export"), rel=1e-4)

    # perplexity of the export = a direct torch computation on the same 12 rows
    model = load_model(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor(rows[:12])
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum").item()
    n_tok = 12 * (SEQ_LEN - 1)
    assert res.value("perplexity", model="export") == pytest.approx(math.exp(nll / n_tok), rel=1e-4)
    assert res.value("bits_per_token", model="export") == pytest.approx(nll / n_tok / math.log(2), rel=1e-4)
    ppl_items = sorted(a["item"] for a in audit if a["suite"] == "perplexity" and a["model"] == "export")
    assert ppl_items == sorted(f"validation:{i}" for i in range(12))  # rows across row groups, none twice

    # the comparison: difference 0 on every metric, with its interval
    assert res.comparisons and all(c["diff"] == pytest.approx(0.0, abs=1e-5) for c in res.comparisons)
    assert all(c["ci_low"] <= c["diff"] + 1e-9 and c["diff"] <= c["ci_high"] + 1e-9 for c in res.comparisons)
    assert "## serve - export (paired bootstrap, 95% CI)" in res.summary

    # outputs
    table = pq.read_table(f"{res.artifact}/results.parquet").to_pylist()
    assert {r["model"] for r in table} == {"export", "serve"} and table == res.rows
    assert len(pq.read_table(f"{res.artifact}/compare.parquet")) == len(res.comparisons)
    assert open(f"{res.artifact}/summary.md").read() == res.summary
    manifest = json.load(open(f"{res.artifact}/manifest.json"))
    assert manifest["stage"] == "eval"
    assert [i["uri"] for i in manifest["inputs"]] == [data]  # the model dir is no artifact (no manifest)
    assert manifest["items"]["tasks"]["items"] == 6 and len(manifest["items"]["tasks"]["items_sha256"]) == 64
    assert manifest["models"]["serve"]["endpoint"] == endpoint.url + "/v1"


def test_chat_format_files_and_reference_suites(tmp_path, model_dir, endpoint):
    from r1ray.eval.run import run

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"the {i} and she was at it " * 3}) for i in range(5)) + "\n")
    refs = tmp_path / "refs.jsonl"
    refs.write_text("\n".join(json.dumps({"prompt": f"{i} + {i + 3} =", "reference": f"{2 * i + 3}."})
                              for i in range(4)) + "\n")
    cfg = _cfg(tmp_path, run_name="chat", model={"path": model_dir, "name": "export"},
               compare={"endpoint": {"url": endpoint.url + "/v1", "model": "tiny"}, "name": "serve"},
               perplexity={"files": [str(docs)], "chunk_chars": 40},
               tasks={"difficulties": [1], "items_per_level": 3, "samples": 0, "max_tokens": 16,
                      "prompt_format": "chat"},
               reference={"path": str(refs), "max_tokens": 8})
    res = run(cfg)
    # chat prompts rendered locally (export) and by the server's chat API (endpoint) give the same accuracy
    assert res.value("accuracy", model="export", suite="tasks") == res.value("accuracy", model="serve", suite="tasks")
    # text chunks are tokenized by the engine or the server: the same NLL either way
    assert res.value("bits_per_byte", model="serve") == pytest.approx(res.value("bits_per_byte", model="export"),
                                                                       rel=1e-4)
    audit = [json.loads(line) for line in open(f"{res.artifact}/samples.jsonl")]
    chunks = [a for a in audit if a["suite"] == "perplexity" and a["model"] == "export"]
    assert len(chunks) > 5 and all(a["tokens"] > 0 for a in chunks)  # documents were cut into several chunks
    for model in ("export", "serve"):
        for metric in ("bleu", "rouge1", "rouge2", "rougeL", "exact_match"):
            assert 0.0 <= res.value(metric, model=model, suite="reference") <= (100.0 if metric == "bleu" else 1.0)
    ref_out = {(a["model"], a["item"]): a["output"] for a in audit if a["suite"] == "reference"}
    assert all(ref_out[("export", i)] == ref_out[("serve", i)] for _, i in ref_out)
