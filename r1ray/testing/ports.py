"""Free loopback ports for tests and benchmarks that start servers (Serve's proxy, Ray's dashboard, Prometheus)."""

from __future__ import annotations

import socket


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
