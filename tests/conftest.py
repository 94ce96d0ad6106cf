"""Shared fixtures: seeded RNG (seed printed on failure), GPU detection, the gpu marker."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest


def _has_cuda_device() -> bool:
    try:
        from pbtvm.target import local_cuda_arch

        return local_cuda_arch() is not None
    except Exception:  # noqa: BLE001
        return False


HAS_GPU = _has_cuda_device()


def pytest_collection_modifyitems(config, items):  # noqa: ANN001, D103
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):  # noqa: ANN001, ANN201
    """A fresh generator per test, seeded from the test id (override with PBTVM_SEED)."""
    seed = int(os.environ.get("PBTVM_SEED", zlib.crc32(request.node.nodeid.encode())))
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001, ANN201, D103
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"rerun with PBTVM_SEED={seeds[0]}"))
