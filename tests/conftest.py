"""Test configuration shared by every suite.

Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET must be set before any
``@triton.jit`` function is defined, so it is set here, at collection start, unless a CUDA GPU is present
(then the kernels run natively).
"""

from __future__ import annotations

import os
from typing import Any

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _one_torch_thread() -> None:
    # On a loaded 2-core machine, OpenMP barriers between torch's intra-op threads make the many tiny ops of
    # small test models several times slower (measured 8x); one thread is faster and steadier.
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # pragma: no cover
        pass


_one_torch_thread()


def pytest_collection_modifyitems(items: list[Any]) -> None:
    """Modules with a ``slow`` test (processes, a real model, the interpreter's kernels) run first, each module's
    tests together and in their order: with ``-n 2`` the quick ones then fill both workers to the end, instead of
    one worker finishing a long test while the other waits."""
    first = {item.module for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.module not in first)
    for item in items:  # (with --dist loadgroup, as pyproject.toml sets: one worker starts the shared server)
        if "embedded_http" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("embedded_http"))


def pytest_unconfigure(config: object) -> None:
    """The test process is about to exit: skip the interpreter's final collection over everything torch and
    transformers made (``dualpath.procexit``; most of a second per process)."""
    from dualpath.procexit import skip_final_collection

    skip_final_collection()
