"""The job's driver process SIGKILLed mid-run, and the same command run again: the run resumes from its newest
checkpoint and ends with the uninterrupted run's export, byte for byte.

``python jobs/grpo.py`` as a user types it, in a subprocess with its own embedded Ray (a learner, an engine pool,
reward tasks). The driver is killed from outside once the run's second checkpoint is complete; Ray's own reaper
takes the embedded cluster down with it (nothing of it may be left), and the second invocation of the same
command finds the checkpoint in the run directory.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1ray.testing.chaos import leftovers
from tests.helpers import save_tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {  # the debug policy, a reward it learns in a few steps, a checkpoint every 2 of 6 steps
    "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 4, "eval_every": 0, "log_every": 1},
    "checkpoint": {"every": 2, "keep": 3},
    "optim": {"lr": 0.02, "warmup_steps": 0, "schedule": "constant"},
    "deepspeed": {"zero_stage": 2}, "scaling": {"num_workers": 1},
    "grpo": {"group_size": 8, "rewards": "{tag_count: 1.0}", "max_completion_tokens": 24, "temperature": 1.0,
             "eval_problems": 8, "difficulty": 1, "eval_difficulties": "[]"},
    "curriculum": "null", "logging": {"wandb": {"mode": "disabled"}}, "ray": {"include_dashboard": "false", "num_cpus": 3},
}


def _flat(d: dict, prefix: str = "") -> list[str]:
    return [a for k, v in d.items() for a in (_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"])]


ARGS = _flat(SETTINGS)


def _command(model_dir: str, root: Path, run_name: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "grpo.py"), f"model.init_from={model_dir}", f"storage.root={root}",
            f"run_name={run_name}", *ARGS]


def wait_until(cond, *, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def _digest(export: Path) -> str:
    return hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()


def test_a_killed_driver_rerun_with_the_same_command_resumes_to_the_same_export(tiny_tokenizer_dir, tmp_path):
    model_dir = save_tiny_model(tiny_tokenizer_dir, tmp_path / "policy", max_positions=512, seed=3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = subprocess.run(_command(model_dir, tmp_path, "ref"), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    cmd = _command(model_dir, tmp_path, "killed")
    run_dir = tmp_path / "runs" / "killed"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: any(run_dir.glob("checkpoint_00000004-*/r1ray_complete.json")) or first.poll() is not None,
                       timeout=600, what="the second checkpoint")
            assert first.poll() is None, "the run ended before it could be killed"
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
    assert not (run_dir / "final").exists()
    # the embedded cluster went down with its driver: no learner, engine or pool controller is left
    wait_until(lambda: not any(leftovers().values()), timeout=60, what="the killed run's processes to exit")

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr  # it continued from the checkpoint, not from step 0
    assert _digest(run_dir / "final") == _digest(tmp_path / "runs" / "ref" / "final")
