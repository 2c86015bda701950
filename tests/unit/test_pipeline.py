"""The pipeline's config, wiring and cache keys (no Ray): what decides which stage runs on what."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1ray.artifacts import write_manifest
from r1ray.config import ConfigError, load_config
from r1ray.pipeline.config import PipelineConfig
from tests.helpers import load_job

REPO = Path(__file__).resolve().parents[2]




def test_stage_flags_and_the_embedded_default():
    job = load_job("pipeline")
    argv = job.argv_with_stage_flags(["--from", "sft", "--until=evaluate", "run_name=x"])
    assert argv[:2] == ["--config", str(REPO / "configs" / "pipeline" / "default.yaml")]
    cfg = load_config(PipelineConfig, argv)
    assert (cfg.from_stage, cfg.until_stage, cfg.run_name) == ("sft", "evaluate", "x")


def test_bad_pipeline_configs_name_the_field():
    with pytest.raises(ConfigError, match="stages must be distinct and in pipeline order"):
        load_config(PipelineConfig, ["stages=[sft, data]"])
    with pytest.raises(ConfigError, match="from_stage='distill' is not one of the pipeline's stages"):
        load_config(PipelineConfig, ["from_stage=distill"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(PipelineConfig, ["stages=[data, finetune]"])


def test_every_stage_config_is_checked_before_anything_runs():
    from r1ray.pipeline.run import check_stage_configs

    cfg = load_config(PipelineConfig, ["pretrain.overrides={optim.lrr: 0.1}", "sft.overrides={train.max_steps: 0}"])
    problems = check_stage_configs(cfg)
    assert any(p.startswith("pretrain: optim.lrr: unknown key; did you mean 'optim.lr'") for p in problems), problems
    assert any(p.startswith("sft: train.max_steps") for p in problems), problems


def test_wiring_shared_blocks_and_run_names(tmp_path):
    from r1ray.pipeline.run import resolve_stage

    cfg = load_config(PipelineConfig, ["run_name=demo", f"storage.root={tmp_path}", "seed=7",
                                       "pretrain.config=[configs/pretrain/debug.yaml]",
                                       "pretrain.overrides={train.max_steps: 5}"])
    pre = resolve_stage(cfg, "pretrain", {"data": "/data/art"})
    # the stage's file says run_name: debug; the pipeline names its runs, shares its storage and seed
    assert pre.run_name == "demo-pretrain" and pre.seed == 7 and pre.storage.root == str(tmp_path)
    assert pre.data.path == "/data/art" and pre.train.max_steps == 5
    sft = resolve_stage(cfg, "sft", {"model": "/runs/demo-pretrain/final"})
    assert sft.model.init_from == "/runs/demo-pretrain/final" and sft.run_name == "demo-sft"
    serve = resolve_stage(cfg, "serve", {"model": "/m"})
    assert serve.model_path == "/m" and serve.model_name == "r1ray-demo"
    # the compression gate's perplexity reads the pipeline's data artifact (a default compress config has none)
    comp = resolve_stage(cfg, "compress", {"model": "/m", "data": "/data/art"})
    assert comp.model == "/m" and comp.eval.perplexity.data == "/data/art" and comp.run_name == "demo-compress"
    from r1ray.pipeline.run import PipelineFailed

    with pytest.raises(PipelineFailed, match="needs the model of an earlier stage"):
        resolve_stage(cfg, "sft", {})


def test_a_nested_override_sets_one_field_and_keeps_the_stage_defaults(tmp_path):
    """``pretrain.overrides.train.global_batch_size=8`` on the command line arrives as a nested mapping; it must set
    that field alone, not replace the stage's ``train`` block with the section's generic defaults (it did: the
    pretraining default of 2,800 steps silently became 200). A dict-typed field is still replaced whole."""
    from r1ray.pipeline.run import resolve_stage
    from r1ray.train.stages.grpo.stage import GRPOConfig
    from r1ray.train.stages.pretrain import PretrainConfig

    cfg = load_config(PipelineConfig, [f"storage.root={tmp_path}", "pretrain.overrides.train.global_batch_size=8",
                                       "pretrain.overrides.train.micro_batch_size=4", "data.overrides.pack.seq_len=64",
                                       "grpo.overrides.grpo.rewards={accuracy: 1.0}", "grpo.overrides.optim.lr=1e-4"])
    pre = resolve_stage(cfg, "pretrain", {"data": "/data/art"})
    default = PretrainConfig().train
    assert (pre.train.global_batch_size, pre.train.micro_batch_size) == (8, 4)
    assert pre.train.max_steps == default.max_steps == 2800 and pre.train.eval_every == default.eval_every
    assert resolve_stage(cfg, "data", {}).pack.seq_len == 64
    grpo = resolve_stage(cfg, "grpo", {"model": "/m"})
    assert grpo.grpo.rewards == {"accuracy": 1.0} and grpo.optim.lr == 1e-4
    assert grpo.optim.schedule == GRPOConfig().optim.schedule == "constant"


def test_the_key_changes_with_the_config_and_with_the_input_artifact(tmp_path):
    from r1ray.pipeline.run import resolve_stage, stage_key

    data = str(tmp_path / "data")
    write_manifest(data, stage="data", config={"v": 1})
    cfg = load_config(PipelineConfig, [f"storage.root={tmp_path}"])
    up = {"data": data}
    key = stage_key("pretrain", resolve_stage(cfg, "pretrain", up), up, ("data",))
    assert key == stage_key("pretrain", resolve_stage(cfg, "pretrain", up), up, ("data",))
    # ray and logging do not change results, so they do not change the key
    quiet = load_config(PipelineConfig, [f"storage.root={tmp_path}", "logging.level=WARNING", "ray.num_cpus=5"])
    assert stage_key("pretrain", resolve_stage(quiet, "pretrain", up), up, ("data",)) == key
    other = load_config(PipelineConfig, [f"storage.root={tmp_path}", "pretrain.overrides={optim.lr: 0.001}"])
    assert stage_key("pretrain", resolve_stage(other, "pretrain", up), up, ("data",)) != key
    write_manifest(data, stage="data", config={"v": 2})  # the data stage reran: pretraining must too
    assert stage_key("pretrain", resolve_stage(cfg, "pretrain", up), up, ("data",)) != key


def test_ctrl_c_stops_serving_cleanly_even_when_pressed_twice():
    """``serve_forever`` (what ``python jobs/pipeline.py`` does after deploying) ends on SIGINT with exit code
    0 and no traceback, and a second SIGINT during the shutdown does not cut it short."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import time\n"
        "from r1ray.pipeline.config import PipelineConfig\n"
        "from r1ray.pipeline.run import serve_forever\n"
        "import r1ray.pipeline.run as run\n"
        "orig = run.log.info\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); time.sleep(1.0)  # the shutdown takes a while: room for a second Ctrl-C\n"
        "run.log.info = slow\n"
        "print('serving', flush=True)\n"
        "serve_forever(PipelineConfig())\n"
        "print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "serving"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err, err


def test_the_registry_is_the_one_list_of_training_stages():
    """Tune, the pipeline and the jobs' upstream preparation read r1ray.train.registry; every entry resolves."""
    from r1ray.pipeline.config import STAGE_ORDER
    from r1ray.pipeline.run import ADAPTERS
    from r1ray.train.registry import STAGES, get_stage

    assert list(STAGE_ORDER) == ["data", *STAGES, "evaluate", "compress", "serve"]
    for name, entry in STAGES.items():
        cls = entry.config_class()
        assert cls().run_name == entry.default_run, name  # a job's default run is the registry's
        assert callable(entry.run_function()) and ADAPTERS[name].config == entry.config
        assert entry.model_from is None or entry.model_from in STAGES
    with pytest.raises(ValueError, match="unknown training stage 'finetune'"):
        get_stage("finetune")


def test_optional_inputs_are_wired_only_when_the_config_wants_them(tmp_path):
    from r1ray.pipeline.run import resolve_stage, stage_key

    up = {"data": "/data/art", "model": "/runs/p/final"}
    on = load_config(PipelineConfig, [f"storage.root={tmp_path}", "sft.overrides={data.replay.fraction: 0.2}"])
    off = load_config(PipelineConfig, [f"storage.root={tmp_path}", "sft.overrides={data.replay.fraction: 0.0}"])
    assert resolve_stage(on, "sft", up).data.replay.data == "/data/art"
    assert resolve_stage(off, "sft", up).data.replay.data is None
    # sequence-mode distillation reads a traces step derived from its own config, with a key of its own
    seq = load_config(PipelineConfig, [f"storage.root={tmp_path}", "run_name=k", "stages=[distill]",
                                       "distill.overrides={distill.mode: sequence, distill.traces: 64}"])
    traces = resolve_stage(seq, "traces", {"model": "/t"})
    assert (traces.teacher, traces.count, traces.run_name) == ("/t", 64, "k-distill")
    assert traces.artifact_uri() == str(tmp_path / "traces" / "k-distill")
    distill = resolve_stage(seq, "distill", {"model": "/t", "traces": traces.artifact_uri()})
    assert distill.data.path == str(tmp_path / "traces" / "k-distill" / "traces.jsonl")
    logit = load_config(PipelineConfig, [f"storage.root={tmp_path}", "stages=[distill]"])
    assert resolve_stage(logit, "distill", {"model": "/t", "traces": "/x"}).data.path is None
    assert stage_key("traces", traces, {}, ()) != stage_key("traces", traces.model_copy(update={"count": 65}), {}, ())


def test_a_job_fills_only_its_unset_inputs(tmp_path):
    """``inputs_for`` prepares nothing a config names (no compute here): the upstream defaults are for unset
    inputs only, and SFT's replay follows its model's chain."""
    from r1ray.pipeline.upstream import inputs_for
    from r1ray.train.stages.distill import DistillConfig
    from r1ray.train.stages.sft import SFTConfig

    named = load_config(SFTConfig, [f"storage.root={tmp_path}", "model.init_from=/m", "data.replay.fraction=0.2"])
    assert inputs_for("sft", named) == {}  # a model you named: no default corpus replayed behind your back
    logit = load_config(DistillConfig, [f"storage.root={tmp_path}", "distill.teacher=/t"])
    assert inputs_for("distill", logit) == {}


def test_a_failed_pipeline_exits_1_naming_itself(monkeypatch, capsys):
    """The job's failure path (no Ray: the library's run is replaced by one that fails as a stage would)."""
    import r1ray.pipeline.run as pipeline_run

    def failing(cfg, on_served=None):
        raise pipeline_run.PipelineFailed("stage sft failed: boom")

    monkeypatch.setattr(pipeline_run, "run", failing)
    job = load_job("pipeline")
    with pytest.raises(SystemExit) as e:
        job.run(load_config(PipelineConfig, ["run_name=demo"]))
    assert e.value.code == 1
    assert "pipeline demo: stage sft failed: boom" in capsys.readouterr().err
