"""Ray Tune over real pretraining runs: ASHA stops bad trials, best.yaml feeds the job, failures stay
contained, and a killed study resumes without rerunning finished trials."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from r1ray.config import load_config
from r1ray.train.stages.pretrain import PretrainConfig
from r1ray.tune.config import TuneConfig

pytestmark = pytest.mark.slow
RAY_NUM_CPUS = 3  # the embedded default on 2 cores: two 1-worker trials at a time, one CPU to spare
RAY_DASHBOARD = True  # the State API: Ray Train frees stopped trials' workers through it (docs/tune.md)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory, tiny_tokenizer_dir):
    from r1ray.data.synthetic_shards import write_data_artifact

    return write_data_artifact(tmp_path_factory.mktemp("data") / "art", tiny_tokenizer_dir, seq_len=32)


def base(data_uri: str, **extra) -> dict:
    return {
        "data.path": data_uri,
        "data.validate_with_ray_data": False,
        "model.preset": "debug",
        "train.max_steps": 12,
        "train.eval_every": 3,
        "train.eval_samples": 32,
        "train.log_every": 3,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.max_failures": 0,
        "checkpoint.every": 6,
        "checkpoint.keep": 1,
        "optim.warmup_steps": 0,
        "scaling.num_workers": 1,
        "deepspeed.zero_stage": 1,
        "logging.wandb.mode": "disabled",
        **extra,
    }


def tune_cfg(tmp_path, data_uri, **kw) -> TuneConfig:
    values = {
        "run_name": "study",
        "storage.root": str(tmp_path),
        "search.max_concurrent_trials": 1,
        "logging.wandb.mode": "disabled",
        **kw,
    }
    data = {"base": kw.pop("base", None) or base(data_uri)}
    values.pop("base", None)
    return load_config(TuneConfig, [], base=data, values=values)


def starts(study_dir: Path) -> dict[str, int]:
    """trial id -> how many times its function started."""
    out = {}
    for f in study_dir.rglob("r1ray_trial_starts.jsonl"):
        lines = f.read_text().splitlines()
        out[json.loads(lines[0])["trial_id"]] = len(lines)
    return out


def live_placement_groups() -> list[str]:
    """Placement groups not removed (read from the GCS, which needs no dashboard)."""
    from ray.util import placement_group_table

    return [pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"]


def wait_no_live_placement_groups(timeout: float = 30) -> list[str]:
    deadline = time.time() + timeout
    while (live := live_placement_groups()) and time.time() < deadline:
        time.sleep(0.5)
    return live


def test_asha_stops_bad_trials_and_best_yaml_feeds_the_job(ray_local, tmp_path, data_uri):
    from r1ray.tune.study import run

    # Good learning rates first (trials run one at a time), so the rungs hold good values when the bad
    # ones arrive.
    cfg = tune_cfg(
        tmp_path, data_uri,
        space={"optim.lr": "grid([0.01, 1e-06, 2e-06])"},
        **{"search.algorithm": "grid", "search.num_samples": 1,
           "scheduler.name": "asha", "scheduler.grace_period": 1, "scheduler.reduction_factor": 2},
    )
    result = run(cfg)
    rows = list(csv.DictReader(open(Path(result.study_dir) / "trials.csv")))
    assert len(rows) == 3 and result.num_errored == 0
    by_lr = {float(r["config.optim.lr"]): r for r in rows}
    evals = 12 // 3
    # The tiny learning rates were stopped before their last evaluation; the good ones were not.
    assert int(by_lr[1e-06]["iterations"]) < evals or int(by_lr[2e-06]["iterations"]) < evals
    assert {by_lr[1e-06]["status"], by_lr[2e-06]["status"]} & {"STOPPED"}
    assert by_lr[0.01]["status"] == "DONE" and int(by_lr[0.01]["iterations"]) >= evals  # every evaluation reached Tune
    assert result.best_params["optim.lr"] == 0.01 and result.best_metric == float(by_lr[0.01]["val_loss"])
    # The stopped trials' worker groups were freed (Ray Train's cleaner, through the State API).
    assert wait_no_live_placement_groups() == [], "a stopped trial's workers kept their placement group"
    assert result.best_metric < min(float(by_lr[1e-06]["val_loss"]), float(by_lr[2e-06]["val_loss"]))

    # best.yaml is a full stage config the pretrain job accepts unchanged.
    best = load_config(PretrainConfig, ["--config", result.best_config_path])
    assert best.optim.lr == result.best_params["optim.lr"]
    assert best.train.max_steps == 12 and best.data.path == data_uri
    # Trials ran under the study's storage root, not the current directory's default.
    assert all(str(tmp_path) in r["export_path"] for r in rows if r["export_path"])
    out = subprocess.run([sys.executable, str(REPO / "jobs/pretrain.py"), "--config", result.best_config_path,
                          "--print-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["optim"]["lr"] == result.best_params["optim.lr"]
    manifest = json.loads((Path(result.study_dir) / "manifest.json").read_text())
    assert manifest["stage"] == "tune" and manifest["counts"]["trials"] == 3
    assert manifest["best"]["export_path"] and Path(manifest["best"]["export_path"]).is_dir()


def test_failing_trial_is_marked_failed_and_study_goes_on(ray_local, tmp_path, data_uri):
    from r1ray.tune.study import run

    cfg = tune_cfg(
        tmp_path, data_uri,
        space={"model.init_from": f"grid([None, '{tmp_path}/no-such-model'])"},
        **{"search.algorithm": "grid", "scheduler.name": "fifo", "trial_max_failures": 1},
    )
    result = run(cfg)
    rows = {r["config.model.init_from"]: r for r in csv.DictReader(open(Path(result.study_dir) / "trials.csv"))}
    assert result.num_trials == 2 and result.num_errored == 1
    assert rows[""]["status"] == "DONE" and float(rows[""]["val_loss"]) > 0
    bad = rows[f"{tmp_path}/no-such-model"]
    assert bad["status"] == "ERROR" and bad["error"]
    # Retried once (trial_max_failures=1): two starts, then marked failed.
    assert sorted(starts(Path(result.study_dir)).values()) == [1, 2]


def test_pbt_copies_the_good_trials_state_into_the_bad_one(ray_local, tmp_path, data_uri):
    """PBT over two concurrent trials, a good and a useless learning rate: the bad trial is restarted from
    the good trial's DeepSpeed checkpoint (a different trial's state), and ends far below where it was."""
    from r1ray.tune.study import run

    cfg = tune_cfg(
        tmp_path, data_uri,
        space={"optim.lr": "grid([0.01, 1e-06])"},
        **{"search.algorithm": "grid", "search.max_concurrent_trials": 2,
           "scheduler.name": "pbt", "scheduler.perturbation_interval": 4},
    )
    result = run(cfg)
    study = Path(result.study_dir)
    resumes = [json.loads(line) for f in study.rglob("r1ray_pbt_resumes.jsonl")
               for line in f.read_text().splitlines()]
    # An exploit: a trial resumed mid-run from a checkpoint trained with the good learning rate.
    exploits = [r for r in resumes if 0 < r["step"] < 12 and r["checkpoint_params"]["optim.lr"] == 0.01]
    assert exploits, f"no trial was restarted from the good trial's checkpoint: {resumes}"
    rows = list(csv.DictReader(open(study / "trials.csv")))
    assert len(rows) == 2 and result.num_errored == 0
    assert all(r["status"] == "DONE" for r in rows), rows
    # lr 1e-6 alone stays at ~6.02 (the ASHA test's bad trials); both trials end near the good one.
    assert max(float(r["val_loss"]) for r in rows) < 5.0, rows
    assert wait_no_live_placement_groups() == [], "a stopped trial's workers kept their placement group"


@pytest.mark.timeout(400)  # a reward task stuck in a placement group hangs: fail in minutes, not at 900 s
def test_grpo_trials_under_asha_with_their_engine_pools(ray_local, tmp_path, tiny_tokenizer_dir):
    """GRPO as a Tune stage: each trial brings its rollout engine pool (Tune runs as many at once as fit with
    the engines: one here), its learner's reward tasks run outside the trial's placement groups (inside them
    they waited forever: the regression this test caught), every held-out evaluation reaches ASHA, every
    placement group (learner and engines) is freed, and best.yaml feeds jobs/grpo.py. The debug policy's
    greedy held-out reward stays 0 in 8 steps for any learning rate, so ASHA has no trial to stop here; the
    pretraining test above proves the stopping."""
    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.tune.study import run

    tok = load_tokenizer(tiny_tokenizer_dir)
    policy = str(save_model(build_model(ModelConfig(preset="debug", max_position_embeddings=512), tok, seed=3),
                            tok, tmp_path / "policy"))
    grpo_base = {
        "model.init_from": policy, "train.max_steps": 8, "train.eval_every": 2, "train.log_every": 2,
        "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.max_failures": 0,
        "checkpoint.every": 4, "checkpoint.keep": 1, "optim.warmup_steps": 0, "optim.schedule": "constant",
        "deepspeed.zero_stage": 0, "scaling.num_workers": 1, "logging.wandb.mode": "disabled",
        "grpo.group_size": 8, "grpo.rewards": {"tag_count": 1.0}, "grpo.max_completion_tokens": 24,
        "grpo.eval_problems": 8, "grpo.temperature": 1.0, "grpo.loss_type": "dapo",
        "curriculum": None, "grpo.difficulty": 1, "grpo.eval_difficulties": [],
    }
    cfg = load_config(TuneConfig, [], base={"base": grpo_base}, values={
        "run_name": "grpo-study", "stage": "grpo", "storage.root": str(tmp_path), "logging.wandb.mode": "disabled",
        "search.metric": "eval_reward", "search.mode": "max", "search.algorithm": "grid",
        "space": {"optim.lr": "grid([0.02, 1e-07])"},
        "scheduler.name": "asha", "scheduler.grace_period": 1, "scheduler.reduction_factor": 2,
    })
    result = run(cfg)
    rows = {float(r["config.optim.lr"]): r for r in csv.DictReader(open(Path(result.study_dir) / "trials.csv"))}
    assert len(rows) == 2 and result.num_errored == 0, rows
    for r in rows.values():  # the 4 evaluations and the final report reached Tune
        assert r["status"] == "DONE" and int(r["iterations"]) == 8 // 2 + 1 and r["eval_reward"] != "", r
    for trial in Path(result.study_dir).glob("*/result.json"):
        reports = [json.loads(line) for line in trial.read_text().splitlines()]
        assert all("accuracy" in x and "eval_reward" in x for x in reports)
        assert any(x.get("reward_mean", 0) > 0 for x in reports)  # sampled rollouts were scored
    assert result.best_params["optim.lr"] in (0.02, 1e-07)
    assert wait_no_live_placement_groups() == [], "a trial's learner or engines kept their placement group"
    out = subprocess.run([sys.executable, str(REPO / "jobs/grpo.py"), "--config", result.best_config_path,
                          "--print-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["optim"]["lr"] == result.best_params["optim.lr"]
