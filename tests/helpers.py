"""Small helpers the test modules share (ports, a local Ray with a metrics port, a pretraining config, a tiny saved
model, the dashboard generator, the job scripts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from r1ray.testing.ports import free_port  # noqa: F401 - the test modules import it from here

ROOT = Path(__file__).resolve().parents[1]


def start_ray_with_metrics(**init: Any) -> tuple[Any, int, str]:
    """A local Ray (3 CPUs) with its dashboard, which writes Prometheus' service-discovery file, and a known
    metrics-export port: (``ray.init``'s context, that port, the session directory). ``init``: more ``ray.init``
    arguments. On an overloaded machine the dashboard agent can miss the raylet's 30 s start-up window: one retry."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for attempt in (1, 2):
        port = free_port()
        try:
            ctx = ray.init(address="local", num_cpus=3, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=free_port(), _metrics_export_port=port, logging_level="WARNING",
                           configure_logging=False, **init)
            break
        except Exception as e:  # noqa: BLE001 - Ray's own "node timed out during startup" is a bare Exception
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print(f"ray.init failed ({e}); retrying once")
    return ctx, port, ray._private.worker._global_node.get_session_dir_path()


def pretrain_cfg(base: list[str], data_dir: str | Path, root: str | Path, *extra: str):
    """A ``PretrainConfig`` from a test module's ``base`` overrides, trained on the data artifact ``data_dir`` and
    stored under ``root`` (its token cache too), then ``extra``."""
    from r1ray.config import load_config
    from r1ray.train.stages.pretrain import PretrainConfig

    return load_config(PretrainConfig, [*base, f"data.path={data_dir}", f"storage.root={root}",
                                        f"data.cache_dir={root}/cache", *extra])


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
