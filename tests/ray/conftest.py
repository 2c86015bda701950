"""One local Ray per test module (``num_cpus=2`` unless the module sets ``RAY_NUM_CPUS``), and the synthetic data
artifact the pretraining modules train on."""

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


@pytest.fixture(scope="module")
def data_dir(tiny_tokenizer_dir, tmp_path_factory):
    """Packed shards of 32 tokens (``r1ray.data.synthetic_shards``) for a module's pretraining runs; a module that
    needs other data defines its own ``data_dir``."""
    from r1ray.data.synthetic_shards import write_data_artifact

    return write_data_artifact(tmp_path_factory.mktemp("data") / "data", tiny_tokenizer_dir, seq_len=32)
