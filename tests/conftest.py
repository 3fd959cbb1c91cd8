"""Shared pytest setup: devices, the extended-test switch, seeding.

- ``device``: every test that takes it runs on "cpu", and on "cuda" when a GPU
  is present (skipped otherwise), so the CUDA kernels get the same tests.
- ``LONGREACH_EXTENDED_TESTS=1`` (testenv.extended_tests_enabled) turns on the
  big grids; tests marked ``@pytest.mark.extended`` are skipped without it.
- OMP_WAIT_POLICY=PASSIVE unless set (see below).
- Every test starts from a seed derived from its own node id, so a failure
  reproduces when the test runs alone and tests do not share random streams.
"""

from __future__ import annotations

import os
import zlib

# On a machine busier than its cores (CI runners, shared boxes), OpenMP threads
# that spin at barriers while their partners are descheduled made small tensor
# ops ~30x slower. Sleeping instead of spinning removes that and keeps the
# kernels multithreaded. Must be set before torch (libgomp) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from testenv import EXTENDED_ENV, extended_tests_enabled


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test runs on: cpu always, cuda where a GPU exists."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"extended: part of the big grid, runs only with {EXTENDED_ENV}=1"
    )


def pytest_collection_modifyitems(config, items):
    if extended_tests_enabled():
        return
    skip = pytest.mark.skip(reason=f"extended grid: set {EXTENDED_ENV}=1 to run")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
