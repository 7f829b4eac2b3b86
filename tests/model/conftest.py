"""Model tests run torch with one intra-op thread: on a loaded 2-core machine, OpenMP barriers between two
threads make the many tiny ops of a small model's forward several times slower (measured 8x). Their async tests
(a session through the emulated cluster) run on asyncio, the cluster's event loop."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
