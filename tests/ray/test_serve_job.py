"""``python jobs/serve.py`` as a user runs it, in a subprocess with its own embedded Ray: requests sent while the
model loads get a prompt 503 with Retry-After, and SIGTERM drains an in-flight request to its end and exits 0
without a traceback.

The subprocess holds its own Ray, so this module starts none (no ``ray_local``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, save_tiny_model

REPO = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("serve-job") / "debug-llama")


def test_loading_503_then_sigterm_drains_and_exits_cleanly(model_dir, tmp_path):
    port = free_port(19000)
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "R1RAY_API_KEY")}
    cmd = [sys.executable, str(REPO / "jobs" / "serve.py"), f"model_path={model_dir}", "model_name=m",
           f"http.port={port}", "engine.device=cpu", "engine.dtype=float32", "deployment.num_cpus=1",
           "ray.num_cpus=2", "ray.include_dashboard=false"]
    out, err = (tmp_path / "stdout").open("w+"), (tmp_path / "stderr").open("w+")
    # Its own session, so a failing test can stop every process the job started (and nothing else).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
    body = {"model": "m", "prompt": "the a of", "max_tokens": 2, "temperature": 0}
    try:
        # 1. While the replica loads its model, every request gets a prompt 503 with Retry-After.
        loading, ready, deadline = [], False, time.monotonic() + 300
        with httpx.Client(base_url=url, timeout=10) as c:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    t0 = time.monotonic()
                    r = c.post("/v1/completions", json=body)
                    took = time.monotonic() - t0
                except httpx.TransportError:  # the proxy is not up yet
                    time.sleep(0.05)
                    continue
                if r.status_code == 503:
                    loading.append((took, r.headers.get("Retry-After"), r.json()["error"]["code"]))
                elif r.status_code == 200:
                    ready = True
                    break
                time.sleep(0.05)  # 404: the app is not deployed yet
        assert ready, (proc.poll(), err.seek(0) or err.read()[-3000:])
        assert loading, "no request arrived while the model was loading"
        assert all(code == "model_loading" and retry == "1" for _, retry, code in loading), loading
        # Answered at once rather than held until the model is ready (the first one also pays the proxy's and
        # the replica's first-request costs on a loaded 2-core machine, hence the median).
        waits = sorted(took for took, _, _ in loading)
        assert waits[len(waits) // 2] < 1.0 and waits[-1] < 30, waits

        # 2. SIGTERM while a long streamed completion is running: it finishes, then the job exits 0.
        n_tokens = 400
        long = {"model": "m", "prompt": "the a of", "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        usage, done = None, False
        with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and json.loads(line[6:]).get("usage"):
                    usage = json.loads(line[6:])["usage"]
        assert done and usage["completion_tokens"] == n_tokens, usage
        rc = proc.wait(timeout=180)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    err.seek(0)
    stderr = err.read()
    assert rc == 0, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert "draining in-flight requests" in stderr, stderr[-4000:]
    print(f"SIGTERM to exit: {took:.1f} s")  # loaded shared machine: informative only
