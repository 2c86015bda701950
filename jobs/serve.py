"""Serve a model over an OpenAI-compatible HTTP API with Ray Serve.

    python jobs/serve.py                                   # newest export of the default run, port 8000
    python jobs/serve.py --config configs/serve/debug.yaml model_path=outputs/runs/default/...
"""

from __future__ import annotations

from r1ray.cli import main
from r1ray.serve.config import ServeConfig as CONFIG


def _announce(info) -> None:
    print(f"\nServing {info.model_name} ({info.model_path})")
    print(f"  OpenAI base URL: {info.url}/v1")
    print(f"  health:          {info.url}/health")
    print("  try it:\n")
    print(info.curl + "\n", flush=True)


def run(cfg: CONFIG):
    from r1ray.pipeline.upstream import serve_model_path
    from r1ray.serve.launch import run as serve_run

    # prepare the model first (training the default run when it is missing), in its own Ray session, so
    # training and Serve never compete for the CPUs
    return serve_run(serve_model_path(cfg), announce=_announce)


if __name__ == "__main__":
    main(CONFIG, run)
