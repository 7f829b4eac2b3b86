"""Kernel tests run the Triton kernels natively on CUDA, or through the interpreter on CPU
(``TRITON_INTERPRET=1`` is set by tests/conftest.py before triton is imported)."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return DEVICE
