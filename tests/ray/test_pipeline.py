"""The pipeline end to end on a small chain (data -> pretrain -> sft): a second run skips every stage, changing
one stage's config reruns that stage and the ones after it only, and a failing stage is named with its log
and resumed on the next run; a compression its gate refuses publishes nothing and hands the uncompressed model on
(or stops the pipeline, as configured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1ray.config import load_config
from r1ray.pipeline.config import PipelineConfig

RAY_NUM_CPUS = 3

pytestmark = pytest.mark.slow

DATA = {"sources": [{"name": "reasoning", "format": "reasoning", "num_docs": 600, "quality_filters": False}],
        "tokenizer.vocab_size": 512, "pack.seq_len": 128}
PRE = {"train.max_steps": 4, "train.eval_every": 4, "train.log_every": 2, "checkpoint.every": 4,
       "scaling.num_workers": 1, "data.validate_with_ray_data": False}
SFT = {"train.max_steps": 2, "train.eval_every": 2, "train.log_every": 1, "checkpoint.every": 2,
       "train.global_batch_size": 8, "train.micro_batch_size": 8, "train.eval_samples": 8, "data.train_examples": 64,
       "data.max_length": 256, "eval.problems_per_difficulty": 2, "eval.max_new_tokens": 8, "scaling.num_workers": 1}


# a destructive compression (no quantization, 90% of the MLP channels pruned) under limits of 0: refused
BAD_COMPRESS = {"quantize.method": "none", "gguf.types": [], "prune.enabled": True, "prune.heads_fraction": 0.0,
                "prune.mlp_fraction": 0.9, "prune.score": "magnitude", "gate.max_accuracy_drop_points": 0.0,
                "gate.max_perplexity_increase_pct": 0.0, "eval.tasks.difficulties": [1],
                "eval.tasks.items_per_level": 2, "eval.tasks.max_tokens": 8, "eval.perplexity.max_rows": 16,
                "report.batch_sizes": [1], "report.new_tokens": 4, "report.repeats": 1}


def make(root: Path, *extra: str, compress: dict | None = None, **sft_extra) -> PipelineConfig:
    return load_config(PipelineConfig, [
        "run_name=t", f"storage.root={root}", "stages=[data, pretrain, sft]", "report=true",
        "logging.wandb.mode=disabled", "ray.include_dashboard=false",
        "data.config=[configs/prepare_data/debug.yaml]", "pretrain.config=[configs/pretrain/debug.yaml]",
        "sft.config=[configs/sft/debug.yaml]", *extra,
    ], values={"data.overrides": DATA, "pretrain.overrides": PRE, "sft.overrides": {**SFT, **sft_extra},
               "compress.overrides": compress or {}})


def test_cache_rerun_and_failure(ray_local, tmp_path):
    from r1ray.artifacts import read_manifest
    from r1ray.pipeline.run import PipelineFailed, run

    first = run(make(tmp_path))
    assert [o.status for o in first.outcomes] == ["ran", "ran", "ran"]
    # lineage of the final model: sft export -> pretrain export -> data artifact
    assert [e["stage"] for e in first.lineage] == ["sft", "pretrain", "data"]
    assert all(e["status"] == "ok" for e in first.lineage)
    report = Path(first.report).read_text()
    assert "## pretrain" in report and (Path(first.root) / "plots" / "pretrain_loss.png").stat().st_size > 1000

    second = run(make(tmp_path))
    assert [o.status for o in second.outcomes] == ["skipped", "skipped", "skipped"]
    assert second.model == first.model

    changed = run(make(tmp_path, **{"optim.lr": 0.001}))
    assert [o.status for o in changed.outcomes] == ["skipped", "skipped", "ran"]
    assert read_manifest(changed.model, stage="sft")["config"]["optim"]["lr"] == 0.001

    # a stage that fails is named with its log; the state says failed and the next run picks it up there
    with pytest.raises(PipelineFailed, match=r"(?s)stage sft failed: .*unknown task .no_such_task.*\n  log: .*logs/sft.log"):
        run(make(tmp_path, **{"data.tasks": {"no_such_task": 1.0}}))
    state = json.loads((Path(first.root) / "state.json").read_text())
    assert state["sft"]["status"] == "failed" and state["pretrain"]["status"] == "done"
    assert "no_such_task" in (Path(first.root) / "logs" / "sft.log").read_text()
    # the rerun resumes at sft, then compresses behind the gate, refused: nothing is published, the uncompressed
    # SFT export is the pipeline's model (what serve gets), the summary and the report card say so with the reasons
    from r1ray.pipeline.run import summary

    with_compress = ("stages=[data, pretrain, sft, compress]",)
    again = run(make(tmp_path, *with_compress, compress=BAD_COMPRESS, **{"optim.lr": 0.001}))
    assert [o.status for o in again.outcomes] == ["skipped", "skipped", "ran", "refused"]
    sft_export = again.outcomes[2].artifact
    comp = again.outcomes[-1]
    assert comp.artifact is None and any("perplexity rose" in r for r in comp.summary["refused"]), comp.summary
    assert again.model == sft_export and again.lineage[0]["stage"] == "sft"
    assert "/runs/t-compress/rejected/" in comp.summary["report"]
    assert not (tmp_path / "runs" / "t-compress" / "final").exists()
    assert "REFUSED by the quality gate" in summary(again)
    assert "quality gate refused the compressed model" in Path(again.report).read_text()
    assert json.loads((Path(first.root) / "state.json").read_text())["compress"]["status"] == "refused"
    # the verdict is cached like an artifact: the same config and input do not compress again
    cached = run(make(tmp_path, *with_compress, compress=BAD_COMPRESS, **{"optim.lr": 0.001}))
    assert [o.status for o in cached.outcomes] == ["skipped", "skipped", "skipped", "refused"]
    assert cached.outcomes[-1].summary["reused"] and cached.model == sft_export
    # on_compress_refused=stop fails the pipeline at the gate instead, naming the reasons
    with pytest.raises(PipelineFailed, match=r"(?s)stage compress: the compression gate refused.*perplexity rose"):
        run(make(tmp_path, *with_compress, "on_compress_refused=stop", compress=BAD_COMPRESS, **{"optim.lr": 0.001}))
