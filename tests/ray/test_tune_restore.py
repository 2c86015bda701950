"""A killed Tune study resumes under its name without rerunning finished trials.

Its own module: the study runs in a subprocess with its own embedded Ray, and no other Ray may run on the
machine meanwhile (Ray Train's placement-group cleaner finds the State API by looking for *the* local Ray;
docs/tune.md)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.ray.test_tune import REPO, base, starts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory, tiny_tokenizer_dir):
    from r1ray.data.synthetic_shards import write_data_artifact

    return write_data_artifact(tmp_path_factory.mktemp("data") / "art", tiny_tokenizer_dir, seq_len=32)


def test_killed_study_resumes_without_rerunning_finished_trials(tmp_path, data_uri):
    """The study driver is SIGKILLed after its first trial finished; rerunning the same name restores it."""
    cfg_file = tmp_path / "tune.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "run_name": "resumable",
        "storage": {"root": str(tmp_path)},
        "base": base(data_uri),
        "space": {"optim.lr": "grid([0.01, 0.003])"},
        "search": {"algorithm": "grid", "max_concurrent_trials": 1},
        "scheduler": {"name": "fifo"},
        "ray": {"num_cpus": 2},
        "logging": {"wandb": {"mode": "disabled"}},
    }))
    cmd = [sys.executable, str(REPO / "jobs/tune.py"), "--config", str(cfg_file)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    study = tmp_path / "tune" / "resumable"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(starts(study)) < 2:  # one trial at a time: 2 started = 1 done
            assert proc.poll() is None, "the study ended before it could be killed"
            time.sleep(1)
        assert len(starts(study)) >= 2, "the second trial never started"
        time.sleep(3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.time()
    before = starts(study)
    first = min(before, key=lambda t: json.loads(next(study.rglob(f"*{t}*/r1ray_trial_starts.jsonl")).read_text().splitlines()[0])["time"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    after = starts(study)
    assert len(after) == 2
    assert after[first] == 1, "a finished trial ran again after restore"
    rows = {r["trial_id"]: r for r in csv.DictReader(open(study / "trials.csv"))}
    assert sorted(r["status"] for r in rows.values()) == ["DONE", "DONE"]

    def finished(trial_id: str) -> float:
        import datetime

        m = json.loads(Path(rows[trial_id]["export_path"], "manifest.json").read_text())
        return datetime.datetime.fromisoformat(m["finished_at"]).timestamp()

    (second,) = set(rows) - {first}
    assert finished(first) < killed_at, "the finished trial's run was redone after restore"
    assert finished(second) > killed_at - 1, "the interrupted trial was not trained after restore"
    assert "best val_loss" in out.stdout

