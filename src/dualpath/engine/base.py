"""The engine interface and what engines share.

An :class:`Engine` is an async actor bound to one device. It owns a host buffer (registered once with its
transport endpoint), a model instance on its device, and handles to the cluster's storage and links. Two roles:

* :class:`~dualpath.engine.prefill.PrefillEngine` (PE): reads PE-side hit blocks into its host buffer and runs
  layer-wise prefill over batches of requests. For layer ``l`` of a batch it waits for that layer's hit KV
  (H2D from its own host buffer on the PE path; the DE's write on the DE path), computes the layer, and ships
  the rows the DE lacks (all of them on the PE path, only the miss on the DE path). The device holds a ring of
  at most ``layers_ahead + 1`` one-layer scratch caches: never the whole KV of the batch.
* :class:`~dualpath.engine.decode.DecodeEngine` (DE): reads DE-side hit blocks into its host buffer and streams
  them to the PE layer by layer, receives the rest of the prompt's KV into its buffer, copies the prompt's KV
  into its paged pool, persists the prompt's new Full Blocks, decodes its running requests in batches
  (continuous batching) and persists every block that fills during decode.

Failure rules (documented contract): every wait on a peer has ``cluster.deadline_s``; a wait that fails or
times out fails the *turn* (:meth:`~dualpath.engine.request.Turn.fail`), which wakes every other wait of that
turn at once (PE and DE race their waits against the turn's failure), releases its buffers and pool pages,
and makes ``Cluster.run_turn`` raise :class:`~dualpath.errors.EngineError` (or retry once with full recompute
when ``cluster.on_transfer_failure = "recompute"``). A block that is missing or corrupt in storage is not a
failure: the hit ends before it and the rest is recomputed.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dualpath.cluster.config import ClusterConfig
from dualpath.engine.host_buffer import HostBuffer
from dualpath.engine.links import LinkSet
from dualpath.engine.model_api import LayerwiseModel
from dualpath.errors import ConfigError
from dualpath.kv.keys import BlockKeyer
from dualpath.kv.layout import KVLayout
from dualpath.scheduler.state import EngineSnapshot
from dualpath.storage.base import Storage
from dualpath.transports.base import Region, Transport
from dualpath.types import EngineId, Role


@contextlib.contextmanager
def allocating(field: str, value: int, unit: str) -> Iterator[None]:
    """An allocation sized by config ``field``: a failure for want of memory is a :class:`ConfigError` naming
    the field and its value, not torch's or numpy's traceback."""
    try:
        yield
    except (MemoryError, OverflowError, RuntimeError) as exc:
        text = " ".join(str(exc).split())
        if isinstance(exc, RuntimeError) and not any(w in text.lower() for w in ("alloc", "overflow", "memory")):
            raise
        raise ConfigError(f"{field}: {value:,} {unit} cannot be allocated here ({text[:200]}); lower it") from None


@dataclass
class EngineContext:
    """What the cluster hands an engine."""

    config: ClusterConfig
    device: torch.device
    model: LayerwiseModel
    layout: KVLayout
    keyer: BlockKeyer
    storage: Storage
    transport: Transport
    links: LinkSet  # the engine's traffic manager is links.managers[engine name]
    tokenizer_source: str | None = None  # the model's tokenizer files (constrained decoding), None: none


class Engine(abc.ABC):
    """Base of both roles (see the module docstring)."""

    role: Role

    def __init__(self, eid: EngineId, ctx: EngineContext) -> None:
        self.eid = eid
        self.ctx = ctx
        self.name = str(eid)
        self.cfg = ctx.config
        self.layout = ctx.layout
        self.model = ctx.model
        self.device = ctx.device
        with allocating("cluster.host_buffer_bytes", ctx.config.host_buffer_bytes, "bytes"):
            self.host = HostBuffer(ctx.config.host_buffer_bytes, f"{self.name} host buffer")
        self.host_region: Region | None = None
        self.seq = 0  # assigned, unfinished requests
        self.tok = 0  # their tokens

    async def start(self) -> None:
        self.host_region = self.ctx.transport.register(self.host.data)

    @abc.abstractmethod
    async def run(self) -> None:
        """The engine's main loop; runs until cancelled."""

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(
            engine=self.eid.rank,
            node=self.eid.node,
            seq=self.seq,
            tok=self.tok,
            read_q=self.ctx.links.read_q_tokens(self.name),
            free_kv_tokens=self.free_kv_tokens(),
        )

    def free_kv_tokens(self) -> int:
        return 0

    def served_context(self) -> int:
        """The longest turn (prompt + generated tokens) this engine serves: the model's context, cut to the prompt
        whose KV its host buffer holds (a prompt's KV passes through it on either read path)."""
        return min(self.model.max_context, self.host.tokens_that_fit(self.layout.full_block_bytes,
                                                                     self.layout.block_tokens))

    def host_offset(self, t: torch.Tensor) -> int:
        """Byte offset of a view of the host arena inside the registered region."""
        return int(t.data_ptr() - self.host.data.data_ptr())
