"""What every process of a deployment agrees on: the checked config, engine names, CURVE keys, plans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dualpath.config import DualPathConfig
from dualpath.control.channel import CurveKeys
from dualpath.errors import ConfigError
from dualpath.types import PathKind, Role


def check_deployable(config: DualPathConfig) -> DualPathConfig:
    """The config a multi-process deployment can run: storage shared between processes, a transport that
    crosses processes. Returns a copy with ``shared_root`` switched on for file backends."""
    st = config.storage
    inner = st.inner if st.kind == "faults" else st  # type: ignore[union-attr]
    if inner.kind == "memory":
        raise ConfigError(
            "storage.kind: 'memory' cannot be shared between processes; use posix (on a shared mount across "
            "hosts) or kvikio for `dualpath serve`"
        )
    tr = config.transport
    tinner = tr.inner if tr.kind == "faults" else tr  # type: ignore[union-attr]
    if tinner.kind == "loopback":
        raise ConfigError("transport.kind: 'loopback' works in one process only; use zmq or nixl for `dualpath serve`")
    data = config.model_dump(mode="python")
    target = data["storage"]["inner"] if st.kind == "faults" else data["storage"]
    target["shared_root"] = True
    return DualPathConfig.model_validate(data)


def serve_defaults() -> dict[str, Any]:
    """Overrides for `dualpath serve` with no config file: posix storage and the zmq transport on loopback."""
    return {
        "storage": {"kind": "posix", "root": "/tmp/dualpath-serve-kv", "shared_root": True},
        "transport": {"kind": "zmq"},
        "cluster": {"snic_gbps": None, "devices": "cpu"},
    }


def engine_names(config: DualPathConfig) -> list[tuple[Role, int, int]]:
    """(role, rank, node) of every engine, prefill first (the in-process cluster's numbering)."""
    cc = config.cluster
    out: list[tuple[Role, int, int]] = []
    for role, nodes in ((Role.PREFILL, cc.prefill_nodes), (Role.DECODE, cc.decode_nodes)):
        for r in range(nodes * cc.engines_per_node):
            out.append((role, r, r // cc.engines_per_node))
    return out


def engine_name(role: Role, rank: int) -> str:
    return f"{'pe' if role is Role.PREFILL else 'de'}{rank}"


def server_curve(config: DualPathConfig) -> CurveKeys | None:
    s = config.serve
    if not s.curve:
        return None
    allowed = list(s.curve_allowed_clients)
    if s.curve_client_public_key and s.curve_client_public_key not in allowed:
        allowed.append(s.curve_client_public_key)
    assert s.curve_public_key is not None and s.curve_secret_key is not None
    return CurveKeys(s.curve_public_key, s.curve_secret_key, allowed=tuple(allowed))


def client_curve(config: DualPathConfig) -> CurveKeys | None:
    s = config.serve
    if not s.curve:
        return None
    if not (s.curve_client_public_key and s.curve_client_secret_key):
        raise ConfigError("serve.curve_client_public_key/secret_key: needed to reach a CURVE-secured scheduler")
    return CurveKeys(s.curve_client_public_key, s.curve_client_secret_key, server=s.curve_public_key)


@dataclass(frozen=True)
class TurnPlan:
    """Which blocks each side reads (the in-process cluster's ``_plan``)."""

    stored_blocks: int
    pe_blocks: int


def plan_sides(stored: int, path: PathKind, pe_blocks: int | None) -> TurnPlan:
    if path is PathKind.RECOMPUTE:
        return TurnPlan(0, 0)
    if path is PathKind.PE:
        k = stored
    elif path is PathKind.SPLIT:
        k = stored // 2 if pe_blocks is None else max(0, min(pe_blocks, stored))
    else:
        k = 0
    return TurnPlan(stored, k)


def combine_hit(pe_ok: int, de_ok: int, pe_blocks: int) -> int:
    """Hit blocks after both reads: a bad block on the PE side ends the hit there."""
    return pe_ok if pe_ok < pe_blocks else pe_blocks + de_ok
