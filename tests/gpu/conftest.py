"""GPU tests: skipped, with the reason, on machines without CUDA."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "tests/gpu" in str(item.fspath):
            item.add_marker(skip)
