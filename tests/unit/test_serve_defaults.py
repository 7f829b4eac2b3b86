"""What ``dualpath serve`` and ``serve --http`` run with no config file: a KV store that cannot fill the machine."""

from __future__ import annotations

import pytest

from dualpath.commands.serve_http import http_config_overrides
from dualpath.config import load_config
from dualpath.control.deploy import SERVE_KV_CAPACITY, serve_defaults
from dualpath.http.backend import INPROCESS_KV_CAPACITY


@pytest.mark.parametrize("mode,kind,cap", [("process", "posix", SERVE_KV_CAPACITY),
                                           ("inprocess", "memory", INPROCESS_KV_CAPACITY)])
def test_the_default_kv_store_is_capped(mode: str, kind: str, cap: int) -> None:
    """Uncapped, a long-running default server stored ~0.7 MB per new prompt of the embedded model: the process
    mode's block files filled /tmp, the in-process one's memory only grew (outside soak audits)."""
    cfg = load_config(http_config_overrides(mode), env={})
    assert cfg.storage.kind == kind and cfg.storage.capacity_bytes == cap
    assert 0 < cap <= 4 << 30
    plain = load_config(serve_defaults(), env={})  # plain `dualpath serve`
    assert plain.storage.kind == "posix" and plain.storage.capacity_bytes == SERVE_KV_CAPACITY
    # a config file's store of another kind drops the default's fields; of the same kind it keeps the cap unless
    # it sets its own (null: none)
    mine = load_config([http_config_overrides(mode), {"storage": {"kind": "posix", "root": "/tmp/x"}}], env={})
    assert mine.storage.capacity_bytes == (SERVE_KV_CAPACITY if kind == "posix" else None)
    none = load_config([http_config_overrides(mode), {"storage": {"kind": kind, "capacity_bytes": None}}], env={})
    assert none.storage.capacity_bytes is None
