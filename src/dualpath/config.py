"""The root configuration: one section per subsystem, loaded from YAML/TOML and ``DUALPATH_*`` variables.

Precedence (later wins): defaults < file < environment < explicit ``overrides``. Environment variables name a
dotted path with double underscores: ``DUALPATH_STORAGE__ROOT=/mnt/kv`` sets ``storage.root``;
``DUALPATH_STORAGE__KIND=posix`` switches the backend. Values are parsed as YAML scalars (``1e9``, ``true``,
``[a, b]``). Every error is a :class:`~dualpath.errors.ConfigError` naming the source and the dotted path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from dualpath._configbase import Section
from dualpath.cluster.config import ClusterConfig
from dualpath.control.config import ServeConfig
from dualpath.errors import ConfigError
from dualpath.http.config import HttpConfig
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
    http: HttpConfig = Field(default_factory=HttpConfig)


class _Loader(yaml.SafeLoader):
    """YAML as a config file needs it: a key given twice is an error naming its line (PyYAML keeps the last one
    silently, so a second ``cluster:`` section would drop the first), and ``1e9`` / ``-2.5E-3`` are numbers
    (YAML 1.2 floats; YAML 1.1, which PyYAML follows, needs a dot and reads ``1e9`` as a string)."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys may be overridden here, by design
            continue
        key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise ConfigError(f"line {line}, column {key_node.start_mark.column + 1}: key {key!r} given twice "
                                  f"(first on line {seen[key]})")
            seen[key] = line
        except TypeError:  # an unhashable key: construct_mapping refuses it with its own message
            continue
    return loader.construct_mapping(node, deep=deep)  # type: ignore[no-untyped-call]


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)  # type: ignore[arg-type]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """A YAML document as config files and ``DUALPATH_*`` values are read (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice in one object")
        out[key] = value
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (line {line}: byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}); save the config file as UTF-8") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix == ".json":
            import json

            data = json.loads(text.removeprefix("\ufeff"), object_pairs_hook=_json_object) if text.strip() else {}
        elif suffix in (".yaml", ".yml"):
            data = parse_yaml(text) or {}
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r} (use .yaml, .yml, .toml or .json)")
    except ConfigError as exc:  # a key given twice
        raise ConfigError(f"{path}: not valid {suffix.lstrip('.').upper()}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        raise ConfigError(f"{path}: not valid {suffix.lstrip('.').upper()}: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _one_line(exc: Exception) -> str:
    """A parser's error in one line: YAML's problem and where (line and column, 1-based), without its excerpt."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        context = getattr(exc, "context", None)
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")
    return " ".join(str(exc).split())


def _set_dotted(target: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = target
    for part in dotted[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[dotted[-1]] = value


def _env_overrides(env: Mapping[str, str], names: dict[tuple[str, ...], str] | None = None) -> dict[str, Any]:
    """The sections ``DUALPATH_*`` variables set; ``names`` gets each dotted path's variable (for errors)."""
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if any(not p for p in dotted):
            raise ConfigError(f"environment variable {name}: empty path component")
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except (yaml.YAMLError, ConfigError) as exc:
            raise ConfigError(f"environment variable {name}: cannot parse value {raw!r}: {_one_line(exc)}") from None
        _set_dotted(out, dotted, value)
        if names is not None:
            names[tuple(dotted)] = f"environment variable {name}"
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


#: pydantic location parts that name a branch of a tagged or plain union, not a field
_UNION_TAGS = {
    "memory", "posix", "kvikio", "faults", "loopback", "zmq", "nixl", "llama", "synthetic",
}

#: the message of a union field whose per-branch messages do not spell out the valid values
_HINTS = {
    "cluster.devices": "use 'auto', 'cpu', or a list of devices, one per engine (e.g. [cuda:0, cuda:1])",
}


def _is_branch(part: object) -> bool:
    """A union-branch location part (``literal['auto','cpu']``, ``list[str]``, a backend tag), not a field."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-"))


def _label(loc: tuple[str, ...], provenance: Mapping[tuple[str, ...], str] | None, source: str) -> str:
    """The source that set ``loc`` (the longest recorded prefix of it), else ``source``."""
    if provenance:
        for n in range(len(loc), 0, -1):
            if loc[:n] in provenance:
                return provenance[loc[:n]]
    return source


def format_validation_error(
    exc: ValidationError, source: str, provenance: Mapping[tuple[str, ...], str] | None = None
) -> str:
    """One line per invalid field, ``<source>: <dotted.field>: <message>``.

    ``provenance`` maps dotted field paths to the source that set them (a file, the environment, keyword
    overrides); a field no source set is labelled ``source``. The errors of the branches of one union field are
    merged into one line that shows the value given.
    """
    merged: dict[str, list[str]] = {}
    inputs: dict[str, object] = {}
    labels: dict[str, str] = {}
    for err in exc.errors():
        parts = tuple(str(p) for p in err["loc"] if not _is_branch(p))
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a backend's kind, not its section
            parts = (*parts, "kind")
        loc = ".".join(parts)
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "value_error":  # a validator's own message, which may name its field already
            msg = msg.removeprefix("Value error, ").removeprefix(f"{loc}: ")
        merged.setdefault(loc, [])
        if msg not in merged[loc]:
            merged[loc].append(msg)
        inputs.setdefault(loc, err.get("input"))
        labels.setdefault(loc, _label(parts, provenance, source))
    lines = []
    for loc, msgs in merged.items():
        text = msgs[0] if len(msgs) == 1 else f"{inputs[loc]!r} is not valid ({'; or: '.join(msgs)})"
        if loc in _HINTS and len(msgs) > 1:
            text = f"{inputs[loc]!r} is not valid: {_HINTS[loc]}"
        lines.append(f"{labels[loc]}: {loc or '<root>'}: {text}")
    return "\n".join(lines)


def validate_section(adapter_type: Any, data: Any, section: str) -> Any:
    """``data`` (a mapping, as a config file's ``section`` holds it) validated as ``adapter_type`` (a backend
    config union chosen by ``kind``); a bad value is a :class:`ConfigError` naming ``section.field``."""
    from pydantic import TypeAdapter

    if not isinstance(data, Mapping):
        raise ConfigError(f"{section}: expected a config object or a mapping with a 'kind', got {type(data).__name__}")
    try:
        return TypeAdapter(adapter_type).validate_python(dict(data))
    except ValidationError as exc:
        lines = format_validation_error(exc, section).splitlines()  # "section: loc: message"; the tag's at <root>
        raise ConfigError("\n".join(line.replace(f"{section}: <root>", f"{section}.kind", 1).replace(
            f"{section}: ", f"{section}.", 1) for line in lines)) from None


def _leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for k, v in data.items():
        path = (*prefix, str(k))
        out.append(path)
        if isinstance(v, Mapping):
            out.extend(_leaves(v, path))
    return out


#: named starting points of :func:`load_config` (``preset=``); ``library`` is the plain defaults
PRESETS = ("library", "demo")


def _preset_data(preset: str) -> tuple[dict[str, Any], str]:
    if preset == "library":
        return DualPathConfig().model_dump(mode="python"), "defaults"
    if preset == "demo":
        from dualpath.runtime.defaults import default_config_dict

        demo = _merge(DualPathConfig().model_dump(mode="python"), default_config_dict())
        return demo, "demo preset"
    raise ConfigError(f"preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")


ConfigSource = str | Path | Mapping[str, Any] | DualPathConfig | Sequence[Any] | None


def load_config(
    source: ConfigSource = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    preset: str = "library",
    **sections: Any,
) -> DualPathConfig:
    """Build a :class:`DualPathConfig`.

    Precedence, later wins: the ``preset`` (``"library"``: the plain defaults; ``"demo"``: what
    ``dualpath run`` uses) < ``source`` < ``DUALPATH_*`` environment < ``overrides`` < keyword ``sections``.

    Args:
        source: a config file (``.yaml``/``.yml``/``.toml``/``.json``), a mapping of sections, a
            :class:`DualPathConfig` (copied), or a list of these merged in order. A partial section keeps the
            section's default ``kind``; changing ``kind`` drops the previous backend's fields.
        env: the environment to read ``DUALPATH_SECTION__FIELD`` variables from (default ``os.environ``;
            pass ``{}`` to ignore it).
        overrides: a mapping of sections merged last (before ``sections``).
        preset: ``"library"`` or ``"demo"``.
        **sections: whole or partial sections by name, e.g. ``storage={"kind": "posix", "root": "/tmp/kv"}``.

    Raises:
        ConfigError: one line per invalid field, ``<source>: <dotted.path>: <message>``, where ``<source>``
            names the file, the environment variable, ``overrides``, ``keyword arguments`` or the preset.
    """
    if "path" in sections and source is None:  # the old name of ``source``
        import warnings

        warnings.warn("load_config(path=...) is deprecated; pass the file as the first argument",
                      DeprecationWarning, stacklevel=2)
        source = sections.pop("path")
    data, base_label = _preset_data(preset)
    provenance: dict[tuple[str, ...], str] = {}
    layers: list[tuple[Mapping[str, Any], str]] = []
    for src in source if isinstance(source, list | tuple) else [source]:
        if isinstance(src, DualPathConfig):
            layers.append((src.model_dump(mode="python"), "config object"))
        elif isinstance(src, Mapping):
            layers.append((src, "dict"))
        elif src is not None:
            path = Path(str(src))
            layers.append((_read_file(path), str(path)))
    env_names: dict[tuple[str, ...], str] = {}
    env_data = _env_overrides(os.environ if env is None else env, env_names)
    if env_data:
        layers.append((env_data, "DUALPATH_* environment"))
    if overrides:
        layers.append((overrides, "overrides"))
    if sections:
        layers.append((sections, "keyword arguments"))
    for layer, label in layers:
        data = _merge(data, layer)
        for leaf in _leaves(layer):
            provenance[leaf] = env_names.get(leaf, label) if layer is env_data else label
    try:
        return DualPathConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, base_label, provenance)) from None


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> DualPathConfig:
    """Validate a complete mapping of sections (no defaults merged in, no environment)."""
    try:
        return DualPathConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
