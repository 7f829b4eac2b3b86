"""Module construction without torch's default weight initialisation.

``torch.nn.Linear``, ``Embedding``, ``LayerNorm``, ... fill their parameters when built (``reset_parameters``: a
Kaiming-uniform pass over every matrix). :func:`~dualpath.model.loader.build_model` overwrites every parameter
right after (a checkpoint's tensors, or its own seeded weights), so that pass is pure cost: most of a warm load of a
small model on a CPU, and a minute or more of CPU time for a model of several billion parameters.

:func:`skip_default_init` turns ``torch.nn.init``'s fill functions into no-ops *for the calling thread only*, for
the duration of the ``with`` block: a module another thread builds meanwhile is initialised as usual. The wrappers
are installed on first entry and removed when the last thread leaves.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: the fill functions of ``torch.nn.init`` that the built-in modules' ``reset_parameters`` reach
_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
          "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")

_lock = threading.Lock()
_local = threading.local()
_users = 0
_originals: dict[str, Callable[..., Any]] = {}


def _skipping() -> bool:
    return getattr(_local, "depth", 0) > 0


def _wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def fill(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _skipping():
            return tensor
        return original(tensor, *args, **kwargs)

    return fill


@contextlib.contextmanager
def skip_default_init() -> Iterator[None]:
    """Inside the block, modules built by this thread keep their parameters as allocated (uninitialised memory):
    use it only where every parameter is assigned afterwards."""
    global _users
    with _lock:
        if _users == 0:
            for name in _FILLS:
                original = getattr(torch.nn.init, name, None)
                if original is not None:
                    _originals[name] = original
                    setattr(torch.nn.init, name, _wrapper(original))
        _users += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        with _lock:
            _users -= 1
            if _users == 0:
                for name, original in _originals.items():
                    setattr(torch.nn.init, name, original)
                _originals.clear()
