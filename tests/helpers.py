"""Small helpers the test modules share (ports, a tiny saved model, the dashboard generator)."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port(start: int | None = None) -> int:
    """A free loopback TCP port: any (``start`` None), or the first free one from ``start`` on (modules that
    run side by side keep to their own ranges)."""
    if start is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in range(start, start + 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + 1000}")


def save_tiny_model(tokenizer_dir: str | Path, out_dir: str | Path, *, max_positions: int = 2048, seed: int = 0) -> str:
    """The ``debug`` preset with the given tokenizer, untrained, saved as an HF directory."""
    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = build_model(ModelConfig(preset="debug", max_position_embeddings=max_positions), tok, seed=seed)
    return str(save_model(model, tok, out_dir))


def dashboards_generator():
    """dashboards/generate.py as a module (it is a script, not part of the package)."""
    name = "r1ray_dashboards_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "dashboards" / "generate.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def load_job(name: str):
    """``jobs/<name>.py`` as a module (jobs are scripts, not part of the package), as the tests call them."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
