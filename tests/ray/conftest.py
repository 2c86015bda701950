"""One local Ray per test module (``num_cpus=2`` unless the module sets ``RAY_NUM_CPUS``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local(request):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    num_cpus = getattr(request.module, "RAY_NUM_CPUS", 2)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=getattr(request.module, "RAY_DASHBOARD", False),
        logging_level="WARNING",
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
