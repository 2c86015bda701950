"""What ``jobs/serve.py`` runs: find the model, start Serve, deploy the app, wait until it answers, announce
the URL, then serve until SIGTERM or Ctrl-C and drain: in-flight requests finish (up to
``deployment.graceful_shutdown_timeout_s``), then Serve and the embedded Ray stop and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import NamedTuple

from r1ray.observe.log import get_logger
from r1ray.serve.config import ServeConfig

log = get_logger(__name__)


class ServeInfo(NamedTuple):
    """What ``deploy`` returns (and ``run`` announces): the app's base URL, the model id clients name, its model, and
    a curl command to try it."""

    url: str
    model_name: str
    model_path: str
    curl: str


def curl_example(url: str, model_name: str, api_key_env: str | None, auth: bool) -> str:
    header = f' \\\n  -H "Authorization: Bearer ${api_key_env or "R1RAY_API_KEY"}"' if auth else ""
    body = (f'{{"model": "{model_name}", "messages": [{{"role": "user", "content": "What is 2 + 3?"}}], "max_tokens": 64}}')
    return f"curl {url}/v1/chat/completions \\\n  -H 'Content-Type: application/json'{header} \\\n  -d '{body}'"


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll ``url/health`` until the replica's model is loaded (200); raise if it failed to load or time ran out.

    The replica answers 503 (``status: loading``) while its model loads in the background."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:  # noqa: S310 - our own loopback URL
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read() or b"{}")
            except ValueError:
                body = {}
            if body.get("status") == "error":
                raise RuntimeError(f"the model failed to load: {body.get('error')}") from None
            last = f"HTTP {e.code} {body.get('status', '')}".strip()
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.2)
    raise TimeoutError(f"the app did not become ready within {timeout_s:.0f} s (last: {last})")


def deploy(cfg: ServeConfig, *, ready_timeout_s: float = 600.0) -> ServeInfo:
    """Start Serve's proxy on ``cfg.http`` in the current Ray and deploy the app; returns once its model is
    loaded and it answers (replicas load in the background and answer 503 meanwhile). With ``variants``:
    the A/B app, ready once every variant's model is loaded; ``model_name`` is then the first alias (or the
    first variant) and ``model_path`` lists each variant's model."""
    from ray import serve

    from r1ray.serve.app import build_app, default_model_name, resolve_model_path

    if cfg.variants:  # A/B: each variant's model; clients name an alias (or a variant)
        paths = {n: resolve_model_path(cfg.variant_config(n)) for n in cfg.variants}
        split = cfg.split()
        model_path = ", ".join(f"{n}={p}" + (f" ({100 * split[n]:.0f}%)" if n in split else "")
                               for n, p in paths.items())
        name = cfg.aliases[0] if cfg.aliases else next(iter(cfg.variants))
    else:
        model_path = resolve_model_path(cfg)
        cfg = cfg.model_copy(update={"model_path": model_path, "model_name": default_model_name(cfg, model_path)})
        name = cfg.model_name
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    t0 = time.perf_counter()
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.http.route_prefix, blocking=False)
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    prefix = cfg.http.route_prefix.rstrip("/")
    url = f"http://{host}:{cfg.http.port}{prefix}"
    wait_ready(url, ready_timeout_s)
    log.info("Serve app %r ready in %.1f s", cfg.app_name, time.perf_counter() - t0)
    return ServeInfo(url=url, model_name=name, model_path=model_path,
                     curl=curl_example(url, name, cfg.auth.api_key_env, cfg.auth.resolve() is not None))


def drain(app_name: str) -> None:
    """Delete the app gracefully: Serve stops routing to it and each replica finishes its in-flight requests
    (up to ``deployment.graceful_shutdown_timeout_s``) before it stops; the proxy stays up to deliver them."""
    from ray import serve

    t0 = time.perf_counter()
    serve.delete(app_name, _blocking=True)
    log.info("drained Serve app %r in %.1f s", app_name, time.perf_counter() - t0)


def run(cfg: ServeConfig, announce: Callable[[ServeInfo], None] | None = None) -> ServeInfo:
    """Deploy and, when ``cfg.blocking``, serve until SIGTERM or Ctrl-C, then drain and stop (exit status 0).

    An existing cluster (``RAY_ADDRESS``) keeps serving after this returns; with the embedded Ray, the app is
    drained and Serve shut down before returning."""
    from r1ray.runtime import ray_session

    with ray_session(cfg.ray) as rt:
        stop = threading.Event()
        handle = cfg.blocking and not rt.reused and threading.current_thread() is threading.main_thread()
        if handle:
            # Replace the handlers Ray left behind (the embedded head's SIGTERM handler kills every process and
            # exits 1; Ray Train's SIGINT handler aborts a controller that no longer exists): a signal only asks
            # the loop below to drain and stop.
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            for sig in previous:
                signal.signal(sig, lambda signum, frame: stop.set())
        try:
            info = deploy(cfg)
            if announce is not None:
                announce(info)
            if cfg.blocking and not rt.reused:
                from ray import serve

                while not stop.wait(1.0):
                    pass
                log.info("stop requested: draining in-flight requests")
                try:
                    drain(cfg.app_name)
                finally:
                    if rt.embedded:
                        serve.shutdown()
            return info
        finally:
            if handle:
                for sig, h in previous.items():
                    signal.signal(sig, h)
