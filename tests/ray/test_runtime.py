"""The runtime: embedded start, reuse of a live session, clean shutdown, and two runs in a row."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import ray

from r1ray.config import RayConfig
from r1ray.runtime import embedded_num_cpus, ray_session


def test_embedded_start_then_clean_shutdown(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    with ray_session(RayConfig(num_cpus=2, include_dashboard=False)) as rt:
        assert ray.is_initialized()
        assert rt.embedded and not rt.reused
        assert ray.cluster_resources()["CPU"] == 2
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
    assert not ray.is_initialized()


def test_reuses_a_live_session_and_leaves_it_running(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        with ray_session(RayConfig()) as rt:
            assert rt.reused and not rt.embedded
        assert ray.is_initialized()  # the owner (a fixture, a notebook) keeps its Ray
    finally:
        ray.shutdown()


def test_default_size_leaves_a_cpu_for_ray_data():
    import os

    assert embedded_num_cpus(RayConfig()) == (os.cpu_count() or 1) + 1
    assert embedded_num_cpus(RayConfig(num_cpus=5)) == 5


def test_two_processes_in_a_row():
    """A job run twice in a row on one machine starts and stops its own Ray each time."""
    code = textwrap.dedent("""
        import os, ray
        os.environ.pop("RAY_ADDRESS", None)
        from r1ray.config import RayConfig
        from r1ray.runtime import ray_session
        with ray_session(RayConfig(num_cpus=1, include_dashboard=False)) as rt:
            assert rt.embedded
            print("ok", ray.get(ray.remote(lambda: 7).remote()))
        assert not ray.is_initialized()
    """)
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "ok 7" in out.stdout
