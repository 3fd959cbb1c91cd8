"""Test-environment switches shared by conftest.py and the test modules
(importable by name because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os

import pytest
import torch

EXTENDED_ENV = "LONGREACH_EXTENDED_TESTS"


def extended_tests_enabled() -> bool:
    """True when the big parameter grids should run (LONGREACH_EXTENDED_TESTS=1)."""
    return os.environ.get(EXTENDED_ENV, "") not in ("", "0")


def skip_unsupported_dtype(device: str, dtype: torch.dtype) -> None:
    """Skip combinations the kernels do not implement (docs/semantics.md: no float64 on CUDA)."""
    if str(device).startswith("cuda") and dtype == torch.float64:
        pytest.skip("the CUDA kernels have no float64 path")
