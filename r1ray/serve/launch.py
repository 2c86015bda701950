"""What ``jobs/serve.py`` runs: find the model, start Serve, deploy the app, announce the URL."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from r1ray.observe.log import get_logger
from r1ray.serve.config import ServeConfig

log = get_logger(__name__)


@dataclass(frozen=True)
class ServeInfo:
    url: str
    model_name: str
    model_path: str
    curl: str


def curl_example(url: str, model_name: str, api_key_env: str | None, auth: bool) -> str:
    header = f' \\\n  -H "Authorization: Bearer ${api_key_env or "R1RAY_API_KEY"}"' if auth else ""
    body = (f'{{"model": "{model_name}", "messages": [{{"role": "user", "content": "What is 2 + 3?"}}], "max_tokens": 64}}')
    return f"curl {url}/v1/chat/completions \\\n  -H 'Content-Type: application/json'{header} \\\n  -d '{body}'"


def deploy(cfg: ServeConfig) -> ServeInfo:
    """Start Serve's proxy on ``cfg.http`` in the current Ray and deploy the app; returns once it is ready."""
    from ray import serve

    from r1ray.serve.app import build_app, default_model_name, resolve_model_path

    model_path = resolve_model_path(cfg)
    cfg = cfg.model_copy(update={"model_path": model_path, "model_name": default_model_name(cfg, model_path)})
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    t0 = time.perf_counter()
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.http.route_prefix, blocking=False)
    log.info("Serve app %r ready in %.1f s", cfg.app_name, time.perf_counter() - t0)
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    prefix = cfg.http.route_prefix.rstrip("/")
    url = f"http://{host}:{cfg.http.port}{prefix}"
    name = cfg.model_name
    return ServeInfo(url=url, model_name=name, model_path=model_path,
                     curl=curl_example(url, name, cfg.auth.api_key_env, cfg.auth.resolve() is not None))


def run(cfg: ServeConfig, announce: Callable[[ServeInfo], None] | None = None) -> ServeInfo:
    """Deploy and, when ``cfg.blocking``, serve until Ctrl-C (or SIGTERM)."""
    from r1ray.runtime import ray_session

    with ray_session(cfg.ray) as rt:
        info = deploy(cfg)
        if announce is not None:
            announce(info)
        if cfg.blocking and not rt.reused:
            import signal
            import threading

            from ray import serve

            if threading.current_thread() is threading.main_thread():
                # Ray Train leaves its own SIGINT handler behind after the training run above (it aborts a
                # controller that no longer exists); Ctrl-C here must simply stop serving.
                signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                log.info("shutting down Serve")
            finally:
                if rt.embedded:
                    serve.shutdown()
        return info
