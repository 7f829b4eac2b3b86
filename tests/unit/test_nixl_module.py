"""Which NIXL module the transport imports, and the UCX transports it asks for on a CUDA machine."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from dualpath.transports import nixl_agent as nixl_transport


def test_import_nixl_takes_the_cuda13_wheel_when_the_cuda12_one_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("nixl_cu13")
    real_import = importlib.import_module

    def only_cu13(name: str, package: str | None = None) -> types.ModuleType:
        if name == "nixl_cu13":
            return fake
        if name in ("nixl_cu12", "nixl"):
            raise ImportError(name)
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", only_cu13)
    assert nixl_transport.import_nixl() is fake


def test_import_nixl_is_none_without_any_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    def none(name: str, package: str | None = None) -> types.ModuleType:
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", none)
    assert nixl_transport.import_nixl() is None
    with pytest.raises(Exception, match="nixl-cu13"):
        nixl_transport._import_nixl()


def test_ucx_tls_gains_the_cuda_transports_only_on_a_cuda_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nixl_transport.ucx_tls_with_cuda("tcp,self,sm") == "tcp,self,sm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nixl_transport.ucx_tls_with_cuda("tcp,self,sm") == "tcp,self,sm,cuda_copy,cuda_ipc"
    assert nixl_transport.ucx_tls_with_cuda(" tcp , sm ") == "tcp,sm,cuda_copy,cuda_ipc"
    # a list that already chooses its CUDA transports, or all of them, is the user's
    assert nixl_transport.ucx_tls_with_cuda("tcp,cuda_copy") == "tcp,cuda_copy"
    assert nixl_transport.ucx_tls_with_cuda("all") == "all"


def test_the_installed_nixl_is_the_one_the_transport_uses() -> None:
    pytest.importorskip("nixl_cu12")
    mod = nixl_transport.import_nixl()
    assert mod is sys.modules["nixl_cu12"]
    assert hasattr(mod, "nixl_agent") and hasattr(mod, "nixl_agent_config")


def test_notif_thread_auto_follows_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from dualpath.transports import config as tconfig

    monkeypatch.setattr(tconfig, "usable_cpus", lambda: 2)
    assert tconfig.NixlTransportConfig().uses_notif_thread is False
    assert tconfig.NixlTransportConfig(notif_thread=True).uses_notif_thread is True
    monkeypatch.setattr(tconfig, "usable_cpus", lambda: 16)
    assert tconfig.NixlTransportConfig().uses_notif_thread is True
    assert tconfig.NixlTransportConfig(notif_thread=False).uses_notif_thread is False
    with pytest.raises(ValueError, match="notif_thread"):
        tconfig.NixlTransportConfig(notif_thread="sometimes")  # type: ignore[arg-type]


def test_nixl_logs_to_stderr_and_only_warnings_unless_asked() -> None:
    """NIXL's Python API logs every agent it starts at INFO on *stdout*, above a command's report."""
    import subprocess

    code = ("import sys; from dualpath.transports.nixl_agent import import_nixl\n"
            "mod = import_nixl()\nif mod is None: sys.exit(3)\n"
            "mod.nixl_agent('probe', mod.nixl_agent_config(backends=['UCX']))\n"
            "import logging; logging.getLogger('nixl').warning('warned')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "NIXL_LOG_LEVEL"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    if p.returncode == 3:
        pytest.skip("no NIXL wheel here")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "warned" in p.stderr and "Initialized NIXL agent" not in p.stderr
