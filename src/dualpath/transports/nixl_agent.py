"""NIXL itself, as the ``nixl`` transport (:mod:`dualpath.transports.nixl`) uses it: finding the installed wheel,
making an agent (with a progress-thread delay the Python wrapper does not expose), descriptor lists prepared once
and reused, and the receiver's notification pump thread."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from dualpath.errors import TransportError
from dualpath.transports.config import NixlTransportConfig

log = logging.getLogger("dualpath.transports.nixl")

_DLIST_CACHE = 512  # prepared descriptor lists kept per side (LRU)
_PUMP_IDLE_AFTER_S = 0.02  # the pump naps notif_idle_poll_s once this long without a notification
_PUMP_PARK_S = 1.0  # a parked notification pump re-checks its stop flag this often


# NIXL's wheels, one per CUDA major (the same API); ``nixl`` is the meta package that imports one of them
NIXL_MODULES = ("nixl_cu12", "nixl_cu13", "nixl")


def import_nixl() -> Any | None:
    """The first importable NIXL module of :data:`NIXL_MODULES`, or ``None``."""
    import importlib

    for name in NIXL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        _quiet_nixl_logging()
        return mod
    return None


def _quiet_nixl_logging() -> None:
    """NIXL's Python API logs each agent it starts at INFO to *stdout*, where a command's report goes: its log
    moves to stderr, and at WARNING unless ``NIXL_LOG_LEVEL`` asks for more."""
    import os

    nixl_logger = logging.getLogger("nixl")
    if not os.environ.get("NIXL_LOG_LEVEL"):
        nixl_logger.setLevel(logging.WARNING)
    for h in nixl_logger.handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout:
            h.setStream(sys.stderr)


def ucx_tls_with_cuda(tls: str) -> str:
    """``tls`` plus UCX's CUDA transports (``cuda_copy``: staging GPU memory; ``cuda_ipc``: GPU to GPU between
    processes) when this machine has a CUDA GPU and ``tls`` names none: without them UCX cannot move VRAM regions.
    A list that names a ``cuda`` transport already, or ``all``, is left as it is."""
    names = [n.strip() for n in tls.split(",") if n.strip()]
    if any(n == "all" or n.startswith("cuda") for n in names) or not torch.cuda.is_available():
        return tls
    return ",".join([*names, "cuda_copy", "cuda_ipc"])


def _import_nixl() -> Any:
    nixl_mod = import_nixl()
    if nixl_mod is None:
        raise TransportError(
            "the nixl transport needs NIXL: pip install 'dualpath[nixl]' (nixl-cu12; nixl-cu13 on CUDA 13)"
        )
    return nixl_mod


_AGENT_CTOR = threading.Lock()


def _make_agent(nixl_mod: Any, name: str, conf: Any, delay_us: int | None) -> Any:
    """A ``nixl_agent``; with ``delay_us``, its progress thread created with that delay. The Python wrapper
    hard-codes the delay to 0, with which NIXL's UCX progress thread never blocks (a core spun while idle); with a
    positive one it waits for UCX events. The wrapper builds the binding's agent in its constructor, so the
    binding's constructor is wrapped for that call only (under a lock: one agent built at a time)."""
    if delay_us is None:
        return nixl_mod.nixl_agent(name, conf)
    api = sys.modules[nixl_mod.nixl_agent.__module__]
    with _AGENT_CTOR:
        bind = api.nixlBind
        make = bind.nixlAgent

        def with_delay(agent_name: str, agent_config: Any) -> Any:
            agent_config.pthrDelay = delay_us
            return make(agent_name, agent_config)

        bind.nixlAgent = with_delay
        try:
            return nixl_mod.nixl_agent(name, conf)
        finally:
            bind.nixlAgent = make


def _mem(t: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", t.get_device()) if t.device.type == "cuda" else ("DRAM", 0)


class _DlistCache:
    """Prepared NIXL descriptor lists (one descriptor each) by ``(addr, nbytes, mem, dev)``, LRU-bounded."""

    def __init__(self, agent: Any, agent_name: str) -> None:
        self.agent, self.agent_name = agent, agent_name
        self.lists: OrderedDict[tuple[int, int, str, int], Any] = OrderedDict()

    def get(self, addr: int, nbytes: int, mem: str, dev: int) -> Any:
        key = (addr, nbytes, mem, dev)
        handle = self.lists.get(key)
        if handle is not None:
            self.lists.move_to_end(key)
            return handle
        handle = self.agent.prep_xfer_dlist(self.agent_name, [(addr, nbytes, dev)], mem)
        self.lists[key] = handle
        if len(self.lists) > _DLIST_CACHE:
            _, old = self.lists.popitem(last=False)
            _release(old)
        return handle

    def drop(self, start: int = 0, end: int = 1 << 64) -> None:
        """Release the lists whose span starts in ``[start, end)`` (all by default)."""
        for key in [k for k in self.lists if start <= k[0] < end]:
            _release(self.lists.pop(key))


def _release(handle: Any) -> None:
    try:  # noqa: SIM105 - cheaper than contextlib.suppress, once per write
        handle.release()
    except Exception:  # released already, or NIXL refused: nothing left to do with it
        pass


class _NotifPump:
    """The receiver's notification poller: a daemon thread that, while grants are outstanding, calls
    ``get_new_notifs`` every ``nap_s`` (which also drives UCX progress, as a raw NIXL receiver's loop does) and hands
    each non-empty batch to the event loop (``call_soon_threadsafe``); after ``_PUMP_IDLE_AFTER_S`` with none it
    naps ``idle_nap_s`` instead. Paused (blocked on an event, no CPU) while no grant is outstanding. Its one agent call
    runs concurrently with the loop thread's, so the agent is created with ``NIXL_THREAD_SYNC_STRICT`` (NIXL's
    agent-wide lock; the default mode takes none)."""

    def __init__(self, name: str, agent: Any, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[dict[str, list[bytes]]], object], cfg: NixlTransportConfig) -> None:
        self.agent, self.loop, self.deliver = agent, loop, deliver
        self.nap_s, self.idle_nap_s = cfg.notif_poll_s, cfg.notif_idle_poll_s
        self._active = threading.Event()
        self._stopping = False
        self.polls = 0  # get_new_notifs calls so far (tests: none while paused)
        self.thread = threading.Thread(target=self._run, name=f"nixl-notifs-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def resume(self) -> None:
        if not self._active.is_set():
            self._active.set()

    def pause(self) -> None:
        self._active.clear()

    def stop(self, timeout: float) -> bool:
        """Stop the thread and join it (bounded); whether it ended."""
        self._stopping = True
        self._active.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def _run(self) -> None:
        agent, sleep, clock = self.agent, time.sleep, time.monotonic
        last = clock()
        while not self._stopping:
            if not self._active.is_set():
                self._active.wait(_PUMP_PARK_S)  # parked: woken by resume() (a grant) or stop()
                last = clock()
                continue
            self.polls += 1
            try:
                notifs = agent.get_new_notifs()
            except Exception as exc:  # pragma: no cover - NIXL error path
                log.error("polling NIXL notifications failed: %r", exc)
                notifs = {}
            if notifs:
                last = clock()
                try:
                    self.loop.call_soon_threadsafe(self.deliver, notifs)
                except RuntimeError:  # the loop is closed: nothing left to deliver to
                    return
            else:
                sleep(self.nap_s if clock() - last < _PUMP_IDLE_AFTER_S else self.idle_nap_s)
