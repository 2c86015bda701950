"""Distillation through real Ray Train + DeepSpeed: logit KD lowers the student's KL to a frozen teacher on
held-out text; sequence-level KD has the teacher (an engine pool on Ray Data) write traces and fine-tunes the
student on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1ray.config import load_config

RAY_NUM_CPUS = 3

pytestmark = pytest.mark.slow

BASE = [
    "model.preset=debug-student", "data.train_examples=256", "data.difficulty=1", "data.max_length=256", "train.max_steps=10",
    "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_every=2", "train.eval_samples=16",
    "train.log_every=2", "checkpoint.every=2", "checkpoint.keep=10", "optim.lr=0.01", "optim.warmup_steps=1",
    "eval.problems_per_difficulty=4", "eval.max_new_tokens=16", "scaling.num_workers=2",
    "logging.wandb.mode=disabled", "ray.include_dashboard=false",
]


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer_dir, tmp_path_factory):
    """A teacher with the tiny tokenizer: the debug preset, seeded (its distributions are what is learnt)."""
    from r1ray.model import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("teacher") / "model"
    tok = load_tokenizer(tiny_tokenizer_dir)
    save_model(build_model(ModelConfig(preset="debug"), tok, seed=11), tok, out)
    return str(out)


def test_logit_distillation_lowers_the_kl_to_the_teacher(ray_local, teacher, tmp_path):
    from r1ray.model.export import list_checkpoints
    from r1ray.train.stages.distill import DistillConfig, run

    cfg = load_config(DistillConfig, [*BASE, f"distill.teacher={teacher}", f"storage.root={tmp_path}",
                                      "distill.temperature=1.0", "distill.student_init=fresh", "run_name=kd"])
    r = run(cfg)
    assert r.status == "completed" and r.stage == "distill"
    kl = []
    for step, uri in list_checkpoints(r.run_dir):
        state = json.loads(Path(uri, "trainer_state.json").read_text())
        kl.append((step, state["metrics"]["val_teacher_kl"]))
    assert [s for s, _ in kl] == [2, 4, 6, 8, 10]
    assert kl[-1][1] < 0.8 * kl[0][1], kl  # held-out KL(teacher || student) falls as the student learns
    assert "teacher_accuracy" in r.metrics and "accuracy" in r.metrics
    # the student is a quarter of the teacher, and it is a loadable HF model
    from transformers import AutoModelForCausalLM

    n_student = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(r.export_path).parameters())
    n_teacher = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher).parameters())
    assert n_student <= 0.3 * n_teacher


def test_sequence_distillation_trains_on_the_teachers_traces(ray_local, teacher, tmp_path):
    """The traces are a step of their own (an artifact with a manifest, made before the stage runs); the stage's
    plan only reads them, and refuses to run without them."""
    from r1ray.artifacts import lineage, read_manifest
    from r1ray.pipeline.upstream import prepare
    from r1ray.train.stages.distill import DistillConfig, run

    cfg = load_config(DistillConfig, [*BASE, f"distill.teacher={teacher}", f"storage.root={tmp_path}",
                                      "distill.mode=sequence", "distill.traces=48", "distill.keep_correct=false",
                                      "distill.max_new_tokens=12", "distill.cpus_per_engine=0.5", "train.max_steps=2",
                                      "run_name=seq"])
    with pytest.raises(ValueError, match="data.path is unset"):
        run(cfg)
    ready = prepare("distill", cfg)
    traces = Path(tmp_path, "traces", "seq")
    assert ready.data.path == str(traces / "traces.jsonl")
    counts = read_manifest(str(traces), stage="traces")["counts"]
    assert counts["traces"] == counts["kept"] == 48
    rows = [json.loads(t)["messages"] for t in (traces / "traces.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and all(m[-1]["role"] == "assistant" for m in rows)
    assert prepare("distill", cfg).data.path == ready.data.path  # the same config reuses them
    r = run(ready)
    assert r.status == "completed"
    # the resolved config (what the manifest records) trains on the traces, and the lineage names them
    m = read_manifest(r.export_path, stage="distill")
    assert m["config"]["data"]["path"].endswith("traces/seq/traces.jsonl")
    assert str(traces) in [e["uri"] for e in lineage(r.export_path)]
    # the default student is cut out of the teacher (r1ray.model.shrink): the preset's width, the teacher's head
    # size (16; a fresh debug-student's is 8)
    student = json.loads(Path(r.export_path, "config.json").read_text())
    assert (student["hidden_size"], student["head_dim"], student["num_key_value_heads"]) == (16, 16, 1)
