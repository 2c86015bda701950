"""Where a job's Ray comes from: an existing cluster, or an embedded local Ray started for this process.

- ``RayConfig.address`` or ``RAY_ADDRESS`` (set by ``ray job submit``) → join that cluster.
- otherwise → start a fresh local Ray (``address="local"``: never silently attach to a stray one) sized
  to the machine, and shut it down when the job ends, so running a job twice in a row works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from r1ray.config import RayConfig
from r1ray.observe.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class RayRuntime:
    address: str
    embedded: bool
    """True when this process started the Ray it uses (and will stop it)."""
    reused: bool
    """True when Ray was already initialised in this process (a test fixture, a notebook)."""
    dashboard_url: str | None
    num_cpus: float


def embedded_num_cpus(cfg: RayConfig) -> int:
    """The embedded Ray's logical CPUs: the machine's cores plus one (see ``RayConfig.num_cpus``)."""
    return cfg.num_cpus or (os.cpu_count() or 1) + 1


def start(cfg: RayConfig, *, runtime_env: dict | None = None) -> RayRuntime:
    """Initialise Ray for this process according to ``cfg``; returns what was done."""
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return RayRuntime(
            address=ctx.gcs_address, embedded=False, reused=True, dashboard_url=None,
            num_cpus=ray.cluster_resources().get("CPU", 0.0),
        )
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ctx = ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=True)
        embedded = False
    else:
        num_cpus = embedded_num_cpus(cfg)
        log.info("no cluster address set: starting an embedded local Ray with %d logical CPUs", num_cpus)
        ctx = ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=cfg.include_dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            logging_level="WARNING",
        )
        embedded = True
    dashboard = getattr(ctx, "dashboard_url", None) or None
    if dashboard and not dashboard.startswith("http"):
        dashboard = f"http://{dashboard}"
    rt = RayRuntime(
        address=ctx.address_info.get("gcs_address", ""), embedded=embedded, reused=False,
        dashboard_url=dashboard, num_cpus=ray.cluster_resources().get("CPU", 0.0),
    )
    if dashboard:
        log.info("Ray dashboard: %s", dashboard)
    return rt


def stop(rt: RayRuntime) -> None:
    """Shut Ray down if this process started or joined it here (a reused session is left alone)."""
    import ray

    if not rt.reused and ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(cfg: RayConfig, *, runtime_env: dict | None = None) -> Iterator[RayRuntime]:
    """``with ray_session(cfg.ray) as rt:`` - Ray is up inside, and cleanly down after (unless reused)."""
    rt = start(cfg, runtime_env=runtime_env)
    try:
        yield rt
    finally:
        stop(rt)
