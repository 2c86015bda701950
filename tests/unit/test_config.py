"""The config loader: defaults < YAML files (in order) < dotted overrides; every problem reported at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from r1ray.config import (
    ConfigError,
    DeepSpeedConfig,
    LoggingConfig,
    OptimConfig,
    R1Config,
    RayConfig,
    ScalingConfig,
    StorageConfig,
    format_help,
    load_config,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[2]


class JobConfig(R1Config):
    """A job for the tests."""

    seed: int = 0
    """Seed."""
    run_name: str = "run"
    """Name of the run."""
    ray: RayConfig = RayConfig()
    """Ray."""
    scaling: ScalingConfig = ScalingConfig()
    """Scaling."""
    storage: StorageConfig = StorageConfig()
    """Storage."""
    optim: OptimConfig = OptimConfig()
    """Optimizer."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed."""
    logging: LoggingConfig = LoggingConfig()
    """Logging."""


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_and_nested_override():
    cfg = load_config(JobConfig, ["optim.lr=3e-4", "scaling.num_workers=[1,2]", "deepspeed.zero_stage=3"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.scaling.num_workers == (1, 2)
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers, cfg.scaling.elastic) == (1, 2, True)
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.optim.name == "adamw" and cfg.seed == 0  # untouched defaults


def test_yaml_files_merge_in_order_then_overrides_win(tmp_path):
    a = write(tmp_path, "a.yaml", """
        seed: 1
        optim: {lr: 0.01, warmup_steps: 5}
        scaling: {num_workers: 4}
    """)
    b = write(tmp_path, "b.yaml", """
        optim: {lr: 0.02}
    """)
    cfg = load_config(JobConfig, ["--config", a, f"--config={b}", "seed=7"])
    assert cfg.optim.lr == 0.02  # b over a
    assert cfg.optim.warmup_steps == 5  # deep merge keeps a's sibling key
    assert cfg.scaling.num_workers == 4
    assert cfg.seed == 7  # override over both files


def test_string_fields_keep_override_text():
    assert load_config(JobConfig, ["run_name=007"]).run_name == "007"


def test_unknown_key_suggests_closest(tmp_path):
    f = write(tmp_path, "typo.yaml", "optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, ["--config", f])
    msg = str(e.value)
    assert "optim.lrr: unknown key" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_top_level_override_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, ["sead=3"])
    assert "did you mean 'seed'" in str(e.value)


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, ["optim.lr=fast"])
    assert "optim.lr" in str(e.value) and "'fast'" in str(e.value)


def test_every_problem_listed_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(
            JobConfig,
            ["optim.lr=-1", "optim.name=sgd", "deepspeed.zero_stage=5", "scaling.num_workers=[3,1]", "bogus=1"],
        )
    err = e.value
    paths = sorted(p.split(":")[0] for p in err.problems)
    assert paths == sorted(["optim.lr", "optim.name", "deepspeed.zero_stage", "scaling.num_workers", "bogus"])
    assert any("'adamw', 'lion'" in p or "adamw" in p for p in err.problems)


def test_cross_field_error_names_fix():
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, ["deepspeed.offload_params=true", "deepspeed.zero_stage=2"])
    assert "offload_params needs zero_stage=3" in str(e.value)


def test_configs_are_frozen():
    cfg = load_config(JobConfig, [])
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]


def test_bad_yaml_and_missing_file(tmp_path):
    bad = write(tmp_path, "bad.yaml", "- just\n- a list\n")
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, ["--config", bad, "--config", str(tmp_path / "missing.yaml")])
    assert len(e.value.problems) == 2
    assert "top level must be a mapping" in str(e.value) and "file not found" in str(e.value)


def test_unrecognised_argument():
    with pytest.raises(ConfigError, match="unrecognised argument 'lr'"):
        load_config(JobConfig, ["lr"])


def test_print_config_round_trips(tmp_path):
    cfg = load_config(JobConfig, ["optim.lr=0.005", "scaling.num_workers=[1,3]"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(JobConfig, ["--config", str(f)]) == cfg
    assert yaml.safe_load(to_yaml(cfg))["optim"]["lr"] == 0.005


def test_help_lists_every_field_with_doc_and_default():
    text = format_help(JobConfig, "job.py")
    assert "optim.lr (float) = 0.001" in text
    assert "Peak learning rate." in text
    assert "deepspeed.zero_stage" in text and "ZeRO stage" in text
    assert "logging.wandb.mode" in text


def _job_scripts():
    return sorted((REPO / "jobs").glob("*.py"))


_PROBE = """
import runpy, sys, time
t0 = time.perf_counter()
sys.argv = [sys.argv[1], "--config", sys.argv[2]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "ray", "transformers", "deepspeed", "pyarrow", "tokenizers") if m in sys.modules)
sys.stdout.write(f"{code} {time.perf_counter() - t0:.3f} {','.join(heavy)}\\n")
"""


@pytest.mark.parametrize("job", _job_scripts(), ids=lambda p: p.name)
def test_job_help_and_fast_typo_failure(job, tmp_path):
    """Every job: --help lists documented fields; a misspelled YAML key fails before any heavy import
    (so in well under 2 s: ~1.2 s measured, mostly pydantic), naming the key and the closest valid one."""
    out = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "seed" in out.stdout
    typo = tmp_path / "typo.yaml"
    typo.write_text("seeed: 3\n")
    out = subprocess.run([sys.executable, str(job), "--config", str(typo)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "seeed: unknown key" in out.stderr and "did you mean 'seed'" in out.stderr
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(job), str(typo)], capture_output=True, text=True,
                           timeout=60, cwd=REPO)
    code, seconds, heavy = (probe.stdout.strip().split(" ") + [""])[:3]
    assert code == "2", probe.stderr
    assert heavy == "", f"{job.name} imports {heavy} before validating its config"
    assert float(seconds) < 5.0  # generous: this machine may be loaded; the import check is the real bound


def _shipped_configs():
    return sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_validates(path):
    """configs/<job>/*.yaml must load into that job's config class unchanged."""
    import importlib.util

    job = REPO / "jobs" / f"{path.parent.name}.py"
    assert job.exists(), f"{path} has no job {job.name}"
    spec = importlib.util.spec_from_file_location(f"job_{path.parent.name}", job)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = load_config(mod.CONFIG, ["--config", str(path)])
    if path.parent.name == "pipeline":  # and every stage's own files and overrides
        from r1ray.pipeline.run import check_stage_configs

        assert check_stage_configs(cfg) == []


def test_an_override_inside_a_section_keeps_the_jobs_other_defaults_for_it():
    """PretrainConfig's optim default is OptimConfig(lr=3e-3, warmup_steps=10): overriding one key of the
    section must keep the job's lr, not fall back to OptimConfig's own 1e-3."""
    from r1ray.train.stages.pretrain import PretrainConfig
    from r1ray.train.stages.sft import SFTConfig

    cfg = load_config(PretrainConfig, ["optim.warmup_steps=3"])
    assert cfg.optim.lr == 3e-3 and cfg.optim.warmup_steps == 3
    sft = load_config(SFTConfig, ["train.eval_every=0"])
    assert sft.train.eval_every == 0 and sft.train.max_steps == SFTConfig().train.max_steps
    assert load_config(PretrainConfig, []) == PretrainConfig()


@pytest.mark.parametrize("path,cls", [
    ("configs/evaluate/default.yaml", "r1ray.eval.config:EvaluateConfig"),
    ("configs/compress/default.yaml", "r1ray.compress.config:CompressConfig"),
    ("configs/pipeline/default.yaml", "r1ray.pipeline.config:PipelineConfig"),
])
def test_a_default_yaml_is_the_code_default_written_out(path, cls):
    """Each ``configs/<stage>/default.yaml`` says it is the embedded default: every value it sets is the config
    class's default (a default lives in the code; the file only shows it), so the two cannot drift apart."""
    import importlib

    module, name = cls.split(":")
    code = getattr(importlib.import_module(module), name)().model_dump(mode="json")
    written = yaml.safe_load((Path(__file__).resolve().parents[2] / path).read_text())

    def differ(c, w, prefix=""):
        for key, value in w.items():
            if isinstance(value, dict) and isinstance(c.get(key), dict):
                yield from differ(c[key], value, f"{prefix}{key}.")
            elif c.get(key) != value:
                yield f"{prefix}{key}: code {c.get(key)!r}, file {value!r}"

    assert list(differ(code, written)) == []
