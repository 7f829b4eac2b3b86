"""Config of a multi-process deployment (``dualpath serve``): the ``serve`` section of the root config."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, model_validator

from dualpath._configbase import Section


class ServeConfig(Section):
    """The scheduler's control address, liveness, deadlines, limits and (optional) CURVE keys.

    Engines and clients reach the scheduler at ``tcp://{host}:{port}`` (``address`` overrides it, e.g. on
    another host). Sockets bind to loopback unless ``host`` is set. With ``curve_secret_key`` set the control
    plane is authenticated and encrypted: the scheduler admits only the keys it knows and maps each to a role:
    ``curve_client_public_key`` and ``curve_allowed_clients`` are clients (submit, stats), ``curve_engine_*`` the
    engines (hello, heartbeat, replies), ``curve_operator_*`` the operator (shutdown, drain). Without engine keys
    the engines use the client pair (legacy; then any client could register as an engine: a warning says so).
    Without CURVE (loopback) engines and the operator prove themselves with the secret tokens of ``token_file``."""

    host: str = Field(default="127.0.0.1", description="scheduler control bind address (loopback by default)")
    port: int = Field(default=7460, ge=0, le=65535, description="scheduler control port; 0 picks a free one")
    address: str | None = Field(default=None, description="where engines/clients reach the scheduler")
    heartbeat_s: float = Field(default=0.2, gt=0, description="engine heartbeat period")
    dead_after_s: float = Field(default=2.0, gt=0, description="an engine silent this long is declared dead")
    request_deadline_s: float = Field(default=120.0, gt=0, description="a submitted turn ends by this deadline")
    max_retries: int = Field(default=3, ge=0, description="re-dispatches of a turn whose engine failed")
    max_message_bytes: int = Field(default=64 << 20, ge=1024, le=1 << 30, description=(
        "largest control-plane message accepted (libzmq refuses larger ones before buffering them)"
    ))
    max_inflight: int = Field(default=4096, ge=1, description="turns accepted at once; more get 'busy'")
    restart_engines: bool = Field(default=True, description="the launcher restarts an engine process that died")
    max_restarts: int = Field(default=10, ge=0, description=(
        "restarts of engine processes the launcher makes before giving up"
    ))
    startup_timeout_s: float = Field(default=120.0, gt=0, description="deadline for every engine to say hello")
    handshake_timeout_s: float = Field(default=5.0, gt=0, le=3600,
                                       description="a connection must complete its (CURVE) handshake by this")
    scheduler_restart: bool = Field(default=True, description="the launcher restarts a scheduler process that died")
    scheduler_standby: bool = Field(
        default=True, description="the launcher keeps a warm standby scheduler process (imports done) to take over "
        "at once; False: a fresh process is started (seconds of imports)")
    fork_engines: bool = Field(
        default=True, description="the launcher forks engine processes from a warm process that imported torch once "
        "(an engine start without seconds of imports; Linux); False: each engine is a fresh python process")
    token_file: Path | None = Field(
        default=None,
        description="without CURVE: JSON file (mode 0600) of the deployment's secret engine/operator tokens; the "
                    "launcher creates <workdir>/control.token",
    )
    curve_public_key: str | None = Field(default=None, description="the scheduler's z85 public key (CURVE)")
    curve_secret_key: str | None = Field(default=None, description="the scheduler's z85 secret key: setting it turns CURVE on")
    curve_client_public_key: str | None = Field(default=None, description="the clients' z85 public key (role client: submit, stats)")
    curve_client_secret_key: str | None = Field(default=None, description="the clients' z85 secret key")
    curve_allowed_clients: list[str] = Field(default_factory=list, description=(
        "more z85 public keys admitted as clients"
    ))
    curve_engine_public_key: str | None = Field(default=None, description="the engines' key pair (role engine)")
    curve_engine_secret_key: str | None = Field(default=None, description="the engines' z85 secret key")
    curve_operator_public_key: str | None = Field(default=None, description="the operator's key (shutdown, drain)")
    curve_operator_secret_key: str | None = Field(default=None, description="the operator's z85 secret key")
    curve_engine_keys: dict[str, str] = Field(
        default_factory=dict,
        description="per-engine CURVE public keys, engine name (pe0, de1, ...) -> key: each key may register only "
                    "as its engine (the launcher generates a pair per engine when no engine key is set)")
    scheduler_hung_after_s: float | None = Field(
        default=None, gt=0, le=3600,
        description="the launcher SIGKILLs and replaces a scheduler whose event loop has not answered its pings "
                    "for this long (default: 5 heartbeat intervals, at least 1 s)")

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> ServeConfig:
        for a, b in (("curve_public_key", "curve_secret_key"),
                     ("curve_client_public_key", "curve_client_secret_key"),
                     ("curve_engine_public_key", "curve_engine_secret_key")):
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                raise ValueError(f"{a} and {b} must be set together")
        for name in ("curve_public_key", "curve_secret_key", "curve_client_public_key", "curve_client_secret_key",
                     "curve_engine_public_key", "curve_engine_secret_key", "curve_operator_public_key",
                     "curve_operator_secret_key"):
            v = getattr(self, name)
            if v is not None and len(v) != 40:
                raise ValueError(f"{name} must be a 40-character z85 key (zmq.curve_keypair())")
        for engine, key in self.curve_engine_keys.items():
            if not re.fullmatch(r"(pe|de)[0-9]{1,5}", engine):
                raise ValueError(f"curve_engine_keys: {engine!r} is not an engine name (pe0, de1, ...)")
            if len(key) != 40:
                raise ValueError(f"curve_engine_keys.{engine} must be a 40-character z85 public key")
        if len(set(self.curve_engine_keys.values())) != len(self.curve_engine_keys):
            raise ValueError("curve_engine_keys: two engines share a key (each engine needs its own pair)")
        return self

    def hung_after_s(self) -> float:
        """How long the scheduler's event loop may leave the launcher's pings unanswered before it is replaced."""
        if self.scheduler_hung_after_s is not None:
            return self.scheduler_hung_after_s
        return max(1.0, 5 * self.heartbeat_s)

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None

    def scheduler_address(self) -> str:
        if self.address:
            return self.address
        host = "127.0.0.1" if self.host in ("0.0.0.0", "*", "") else self.host
        return f"tcp://{host}:{self.port}"
