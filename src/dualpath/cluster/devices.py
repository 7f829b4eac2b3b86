"""Map engines to devices: ``auto`` (cuda:0..n-1 round-robin when GPUs exist, cpu otherwise), ``cpu``, or an
explicit list used round-robin. A device this machine does not have is a :class:`ConfigError`."""

from __future__ import annotations

import torch

from dualpath.errors import ConfigError


def check_device(name: str) -> torch.device:
    """The torch device for ``name``; ConfigError when this machine does not have it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"cluster.devices: {name!r} is not a device name ({exc})") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise ConfigError(
                f"cluster.devices: {name!r} does not exist on this machine ({count} CUDA device(s) visible)"
            )
        return torch.device("cuda", index)
    raise ConfigError(f"cluster.devices: device type {dev.type!r} of {name!r} is not supported (use cpu or cuda:N)")


def resolve_devices(spec: str | list[str], n_engines: int) -> list[torch.device]:
    """One device per engine, in engine order (prefill engines first, then decode engines)."""
    if spec == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return [torch.device("cpu")] * n_engines
        return [torch.device("cuda", i % count) for i in range(n_engines)]
    if spec == "cpu":
        return [torch.device("cpu")] * n_engines
    if isinstance(spec, str):
        names = [spec]
    else:
        names = list(spec)
    if not names:
        raise ConfigError("cluster.devices: empty device list")
    devices = [check_device(n) for n in names]
    return [devices[i % len(devices)] for i in range(n_engines)]
