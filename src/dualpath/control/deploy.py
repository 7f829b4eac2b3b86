"""What every process of a deployment agrees on: the checked config, engine names, CURVE keys, plans."""

from __future__ import annotations

import json
import os
import secrets
import stat
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


#: the default deployment's KV store cap, bytes (per writing engine: each keeps its own blocks under it)
SERVE_KV_CAPACITY = 4 << 30


def serve_defaults() -> dict[str, Any]:
    """Overrides for `dualpath serve` with no config file: posix storage and the zmq transport on loopback. The
    store is capped (:data:`SERVE_KV_CAPACITY`, least recently used blocks evicted): a long-running default
    deployment stored ~0.7 MB per new prompt of the embedded model and would fill ``/tmp``."""
    return {
        "storage": {"kind": "posix", "root": "/tmp/dualpath-serve-kv", "shared_root": True,
                    "capacity_bytes": SERVE_KV_CAPACITY},
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


#: the control-plane roles and the messages each may send to the scheduler
ROLES = ("client", "engine", "operator")


def key_roles(config: DualPathConfig) -> dict[str, frozenset[str]]:
    """With CURVE: the scheduler's map from an authenticated public key (z85, the ZAP User-Id) to its roles.

    Clients: ``curve_client_public_key`` and ``curve_allowed_clients``; engines: ``curve_engine_public_key``
    (without it, legacy: the client pair is the engines' too); operator: ``curve_operator_public_key``."""
    s = config.serve
    roles: dict[str, set[str]] = {}
    for key in [*s.curve_allowed_clients, s.curve_client_public_key]:
        if key:
            roles.setdefault(key, set()).add("client")
    engine_key = s.curve_engine_public_key or s.curve_client_public_key
    if engine_key:
        roles.setdefault(engine_key, set()).add("engine")
    for key in s.curve_engine_keys.values():  # per-engine keys: each may register only as its engine
        roles.setdefault(key, set()).add("engine")
    if s.curve_operator_public_key:
        roles.setdefault(s.curve_operator_public_key, set()).add("operator")
    return {k: frozenset(v) for k, v in roles.items()}


def engine_key_names(config: DualPathConfig) -> dict[str, str]:
    """With per-engine keys (``serve.curve_engine_keys``): public key -> the one engine it may register as."""
    return {key: name for name, key in config.serve.curve_engine_keys.items()}


def create_engine_keys(config: DualPathConfig) -> dict[str, tuple[str, str]]:
    """A fresh CURVE key pair for every engine of ``config``: engine name -> (public, secret), z85 text."""
    import zmq

    out: dict[str, tuple[str, str]] = {}
    for role, rank, _node in engine_names(config):
        pub, sec = zmq.curve_keypair()
        out[engine_name(role, rank)] = (pub.decode(), sec.decode())
    return out


def server_curve(config: DualPathConfig) -> CurveKeys | None:
    s = config.serve
    if not s.curve:
        return None
    assert s.curve_public_key is not None and s.curve_secret_key is not None
    return CurveKeys(s.curve_public_key, s.curve_secret_key, allowed=tuple(key_roles(config)))


def client_curve(config: DualPathConfig) -> CurveKeys | None:
    s = config.serve
    if not s.curve:
        return None
    if not (s.curve_client_public_key and s.curve_client_secret_key):
        raise ConfigError("serve.curve_client_public_key/secret_key: needed to reach a CURVE-secured scheduler")
    return CurveKeys(s.curve_client_public_key, s.curve_client_secret_key, server=s.curve_public_key)


def engine_curve(config: DualPathConfig) -> CurveKeys | None:
    """This engine's CURVE pair (``curve_engine_*``: its own pair when the scheduler lists it in
    ``serve.curve_engine_keys``, else one shared by every engine; without it the client pair, legacy)."""
    s = config.serve
    if not s.curve:
        return None
    if s.curve_engine_public_key and s.curve_engine_secret_key:
        return CurveKeys(s.curve_engine_public_key, s.curve_engine_secret_key, server=s.curve_public_key)
    return client_curve(config)


def operator_curve(config: DualPathConfig) -> CurveKeys | None:
    s = config.serve
    if not s.curve:
        return None
    if not (s.curve_operator_public_key and s.curve_operator_secret_key):
        raise ConfigError("serve.curve_operator_public_key/secret_key: needed for shutdown/drain of a "
                          "CURVE-secured scheduler")
    return CurveKeys(s.curve_operator_public_key, s.curve_operator_secret_key, server=s.curve_public_key)


# --- secret tokens (no CURVE: loopback) -------------------------------------------------------------------
def create_tokens(path: str | os.PathLike[str]) -> dict[str, str]:
    """Write fresh secret tokens for the engine and operator roles to ``path`` (mode 0600, never overwritten
    in place: a new file is renamed over it); returns them."""
    tokens = {"engine": secrets.token_hex(24), "operator": secrets.token_hex(24)}
    p = os.fspath(path)
    tmp = f"{p}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, json.dumps(tokens).encode())
    finally:
        os.close(fd)
    os.replace(tmp, p)
    return tokens


def load_tokens(path: str | os.PathLike[str]) -> dict[str, str]:
    """The tokens of ``serve.token_file``; refused unless a regular file only its owner can read or write."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigError(f"serve.token_file: cannot open {p}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"serve.token_file: {p} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"serve.token_file: {p} is readable by others (mode {st.st_mode & 0o777:o}); "
                              "chmod 600 it")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        tokens = json.loads(data)
    except ValueError:
        raise ConfigError(f"serve.token_file: {p} is not a JSON object of tokens") from None
    if not isinstance(tokens, dict) or not all(isinstance(tokens.get(r), str) and len(tokens[r]) >= 16
                                               for r in ("engine", "operator")):
        raise ConfigError(f"serve.token_file: {p} needs string tokens 'engine' and 'operator' (16+ characters)")
    return {"engine": tokens["engine"], "operator": tokens["operator"]}


def token_for(config: DualPathConfig, role: str) -> str | None:
    """This side's token for ``role`` from ``serve.token_file`` (None without one)."""
    tf = config.serve.token_file
    return load_tokens(tf)[role] if tf is not None else None


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
