"""The root configuration: one section per subsystem, loaded from YAML/TOML and ``DUALPATH_*`` variables.

Precedence (later wins): defaults < file < environment < explicit ``overrides``. Environment variables name a
dotted path with double underscores: ``DUALPATH_STORAGE__ROOT=/mnt/kv`` sets ``storage.root``;
``DUALPATH_STORAGE__KIND=posix`` switches the backend. Values are parsed as YAML scalars (``1e9``, ``true``,
``[a, b]``). Every error is a :class:`~dualpath.errors.ConfigError` naming the source and the dotted path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from dualpath._configbase import Section
from dualpath.cluster.config import ClusterConfig
from dualpath.control.config import ServeConfig
from dualpath.errors import ConfigError
from dualpath.model.config import ModelConfig, SyntheticModelConfig
from dualpath.scheduler.config import SchedulerConfig
from dualpath.storage.config import MemoryStorageConfig, StorageConfig
from dualpath.transports.config import LoopbackTransportConfig, TransportConfig
from dualpath.workload.config import WorkloadConfig

ENV_PREFIX = "DUALPATH_"


class DualPathConfig(Section):
    """The whole configuration of a deployment (or an emulated one)."""

    storage: StorageConfig = Field(default_factory=MemoryStorageConfig)
    transport: TransportConfig = Field(default_factory=LoopbackTransportConfig)
    model: ModelConfig = Field(default_factory=SyntheticModelConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r} (use .yaml, .yml, .toml or .json)")
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise ConfigError(f"{path}: not valid {suffix.lstrip('.').upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _set_dotted(target: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = target
    for part in dotted[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[dotted[-1]] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if any(not p for p in dotted):
            raise ConfigError(f"environment variable {name}: empty path component")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: cannot parse value {raw!r}: {exc}") from exc
        _set_dotted(out, dotted, value)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            # switching a backend's kind drops the old backend's fields
            if "kind" in value and value["kind"] != merged[key].get("kind"):
                merged[key] = dict(value)
            else:
                merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {loc or '<root>'}: {msg}")
    return "\n".join(lines)


_UNION_TAGS = {
    "memory", "posix", "kvikio", "faults", "loopback", "zmq", "nixl", "llama", "synthetic",
}


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DualPathConfig:
    """Build the config from defaults, an optional file, ``DUALPATH_*`` variables and explicit overrides."""
    # Start from the defaults so that a partial section (``storage: {root: ...}``) keeps its default ``kind``.
    data: dict[str, Any] = DualPathConfig().model_dump(mode="python")
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        data = _merge(data, _read_file(path))
        source = str(path)
    env_data = _env_overrides(os.environ if env is None else env)
    if env_data:
        data = _merge(data, env_data)
        source = f"{source} + DUALPATH_* environment" if path is not None else "DUALPATH_* environment"
    if overrides:
        data = _merge(data, overrides)
    try:
        return DualPathConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> DualPathConfig:
    try:
        return DualPathConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
