"""The state of one turn (request) as it moves through the two engines, and its result.

A :class:`Turn` is shared by the prefill engine and the decode engine of one process (the in-process control
plane: events and plain fields); the KV bytes themselves move only through storage and the transport.

Hit plan (block indices): blocks ``[0, pe_blocks)`` are read on the PE side, ``[pe_blocks, stored)`` on the
DE side; after the reads, ``hit`` is the longest prefix of blocks that every side read correctly (a missing
or corrupt block ends the hit there; everything after it is recomputed). The DE then lacks the rows
``[0, min(pe_blocks, hit) * bt)`` (PE-read hit) and ``[hit * bt, prompt)`` (computed): :meth:`Turn.ship_ranges`.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from dualpath.errors import EngineError
from dualpath.types import BlockKey, PathKind, TokenLogprob

if TYPE_CHECKING:  # torch only where a request is built (engines): clients import TurnResult without it
    import torch

    from dualpath.engine.sampling import SamplingParams
    from dualpath.kv.layout import KVLayout

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

_rids = itertools.count(1)


@dataclass
class TurnTimings:
    """Wall-clock instants (``time.perf_counter``) of one turn."""

    t_submit: float = 0.0
    t_read_done: float = 0.0
    t_prefill_start: float = 0.0
    t_prefill_done: float = 0.0
    t_first_token: float = 0.0
    t_second_token: float = 0.0
    t_last_token: float = 0.0  # the last token out (t_done also waits for the turn's writes; 0: not known)
    t_done: float = 0.0
    t_scheduled: float = 0.0  # when a scheduler assigned the turn (0: run on the cluster directly)

    @property
    def ttft(self) -> float:
        return self.t_first_token - self.t_submit

    @property
    def tpot(self) -> float:
        return self.t_second_token - self.t_first_token if self.t_second_token else 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class TurnResult:
    """The result of one turn: the one type every turn API returns.

    :meth:`dualpath.Session.run_turn`, :meth:`dualpath.cluster.Cluster.run_turn` and
    :meth:`dualpath.scheduler.driver.SchedulerDriver.run_turn` all return it.

    * ``token_ids`` (also ``tokens``): the generated token ids, fed back into the next turn's prompt;
    * ``prompt_tokens``, ``hit_tokens`` (the prefix whose KV was loaded from storage), ``stored_tokens`` (the
      prefix found by the lookup: ``hit_tokens`` is smaller when a stored block was missing or corrupt);
    * ``path``: where the hit KV was read (:class:`~dualpath.types.PathKind`); ``pe``/``de``: the engines;
    * ``timings``: ``time.perf_counter()`` instants (:class:`TurnTimings`); :attr:`phases` has the durations;
    * ``link_bytes`` (also ``bytes``): bytes this turn charged to each emulated link, by link name
      (``pnode0.snic.read``, ``pe0.cnic.in``, ...).
    """

    rid: int
    session: Any  # str or int: whatever the caller named the session
    token_ids: list[int]
    prompt_tokens: int
    hit_tokens: int
    stored_tokens: int  # hit found by lookup before the reads (hit_tokens can be smaller after a bad block)
    path: PathKind
    pe: int
    de: int
    timings: TurnTimings
    link_bytes: dict[str, int] = field(default_factory=dict)  # "pe0.cnic.in" -> bytes this turn charged
    logits: list[torch.Tensor] | None = None  # per generated token (cluster.keep_logits)
    logprobs: list[TokenLogprob] | None = None  # per generated token, when the sampling asked (logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token after the first (prompt_logprobs)
    retried_recompute: bool = False

    # --- the flat view (also what the workload clients read) -----------------------------------------------
    @property
    def tokens(self) -> list[int]:
        """The generated token ids (same list as ``token_ids``)."""
        return self.token_ids

    @property
    def bytes(self) -> dict[str, int]:
        """Bytes charged per emulated link (same dict as ``link_bytes``)."""
        return self.link_bytes

    @property
    def t_submit(self) -> float:
        return self.timings.t_submit

    @property
    def t_scheduled(self) -> float | None:
        return self.timings.t_scheduled or None

    @property
    def t_first_token(self) -> float:
        return self.timings.t_first_token

    @property
    def t_second_token(self) -> float | None:
        return self.timings.t_second_token or None

    @property
    def t_last_token(self) -> float:
        """When the last token was out (the turn's end, ``t_done``, also waits for its blocks to be stored)."""
        return self.timings.t_last_token or self.timings.t_done

    @property
    def t_done(self) -> float:
        return self.timings.t_done

    @property
    def ttft(self) -> float:
        """Time to first token: submission (to the scheduler, or to the cluster) to the first token."""
        return self.timings.t_first_token - self.timings.t_submit

    @property
    def ttst(self) -> float | None:
        """First to second token (None with fewer than two tokens)."""
        t2 = self.t_second_token
        return None if t2 is None else t2 - self.timings.t_first_token

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, to the last token (None with fewer than two tokens)."""
        n = len(self.token_ids)
        return None if n < 2 else (self.t_last_token - self.timings.t_first_token) / (n - 1)

    @property
    def phases(self) -> dict[str, float]:
        """Seconds spent in each phase: ``queue`` (waiting for the scheduler; 0 without one), ``read`` (storage
        reads of the hit KV), ``prefill`` (until the PE's last layer), ``first_token``, ``decode`` (first token to
        the last one persisted), ``total``."""
        t = self.timings
        start = t.t_scheduled or t.t_submit

        def span(a: float, b: float) -> float:
            return max(0.0, b - a) if a and b else 0.0

        return {
            "queue": span(t.t_submit, t.t_scheduled) if t.t_scheduled else 0.0,
            "read": span(start, t.t_read_done),
            "prefill": span(t.t_read_done, t.t_prefill_done),
            "first_token": span(t.t_prefill_done, t.t_first_token),
            "decode": span(t.t_first_token, t.t_done),
            "total": span(t.t_submit, t.t_done),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "rid": self.rid,
            "session": self.session,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
            "stored_tokens": self.stored_tokens,
            "path": self.path.value,
            "pe": self.pe,
            "de": self.de,
            "timings": self.timings.to_dict(),
            "phases": self.phases,
            "link_bytes": self.link_bytes,
        }


class Turn:
    """One request in flight (see the module docstring)."""

    def __init__(
        self,
        session: str,
        prompt_ids: list[int],
        gen_tokens: int,
        pe: int,
        de: int,
        path: PathKind,
        keys: list[BlockKey],
        stored_blocks: int,
        pe_blocks: int,
        layout: KVLayout,
    ) -> None:
        self.rid = next(_rids)
        self.session = session
        self.prompt_ids = prompt_ids
        import torch

        self.prompt = torch.tensor(prompt_ids, dtype=torch.int64)
        self.gen_tokens = gen_tokens
        self.pe = pe
        self.de = de
        self.path = path
        self.keys = keys
        self.stored_blocks = stored_blocks
        self.pe_blocks = pe_blocks  # hit blocks read on the PE side: [0, pe_blocks)
        self.layout = layout
        self.hit_blocks = 0  # set once both reads are done
        self.timings = TurnTimings(t_submit=time.perf_counter())
        self.link_bytes: dict[str, int] = {}
        self.error: BaseException | None = None
        self.failed = anyio.Event()
        self.prefill_started = anyio.Event()
        self.prefill_done = anyio.Event()
        self.pe_released = anyio.Event()  # the PE no longer touches this turn's buffers
        self.first_logits: torch.Tensor | None = None
        # DE-path streaming window: PE sets exposed[l] once layer l's landing is exposed
        self.exposed = [anyio.Event() for _ in range(layout.n_layers)]
        # host regions held while the turn is in flight (released by the owner engine)
        self.pe_host: Any = None
        self.de_host: Any = None
        self.de_recv: Any = None
        # chunked prefill (PE): prompt tokens whose KV the PE holds after this turn's earlier chunks (0 before
        # the first chunk ran), and the PE device buffer ``[n_layers, blocks, bt, bytes]`` that holds them
        self.prefilled = 0
        self.pe_kv: torch.Tensor | None = None
        self.pe_work = 0  # predicted PE work (us) not yet in a forward (PrefillEngine.work_model; 0 without)
        # how the decode engine picks tokens (None = greedy) and who hears each token as it is decoded
        self.sampling: SamplingParams | None = None
        self.on_token: Callable[[int], None] | None = None
        self.on_logprob: Callable[[TokenLogprob], None] | None = None  # before on_token (sampling.logprobs)
        #: called once the prompt's new Full Blocks are stored (or their write failed, or there were none): a
        #: request sharing this prompt's prefix may go and load it (the HTTP front's shared prefixes)
        self.on_stored: Callable[[], None] | None = None
        self.prompt_lps: list[TokenLogprob] = []  # the PE's, for prompt tokens 1.. (sampling.prompt_logprobs)

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def bt(self) -> int:
        return self.layout.block_tokens

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prompt_blocks(self) -> int:
        """Blocks that hold the prompt, the partial last one included."""
        return -(-self.prompt_len // self.bt)

    @property
    def hit_tokens(self) -> int:
        return self.hit_blocks * self.bt

    @property
    def pe_hit_blocks(self) -> int:
        """Hit blocks that came from the PE side's read."""
        return min(self.pe_blocks, self.hit_blocks)

    @property
    def de_hit_blocks(self) -> int:
        """Hit blocks the DE streams to the PE (DE path)."""
        return self.hit_blocks - self.pe_hit_blocks

    def ship_ranges(self) -> list[tuple[int, int]]:
        """Token rows the PE ships to the DE after each layer (the rows the DE does not already hold). With state
        pages (:attr:`KVSpec.state_pages`) the last range runs to the end of the prompt's last block: a state page
        is whole or useless."""
        bt = self.bt
        end = self.prompt_blocks * bt if self.layout.spec.state_pages else self.prompt_len
        ranges: list[tuple[int, int]] = []
        if self.pe_hit_blocks:
            ranges.append((0, self.pe_hit_blocks * bt))
        start = self.hit_blocks * bt
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
        return ranges

    @property
    def ship_rows(self) -> int:
        return sum(e - s for s, e in self.ship_ranges())

    # --- bookkeeping -------------------------------------------------------------------------------------
    def charge(self, link: str, nbytes: int) -> None:
        if nbytes:
            self.link_bytes[link] = self.link_bytes.get(link, 0) + int(nbytes)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.failed.set()

    def check(self) -> None:
        if self.error is not None:
            raise EngineError(f"turn {self.rid} ({self.session}) failed: {self.error}") from self.error

    def tag(self, what: str, layer: int, part: int = 0) -> str:
        return f"r{self.rid}/{what}/l{layer}/p{part}"


async def wait_event(turn: Turn, event: anyio.Event, timeout: float, what: str) -> None:
    """Wait for ``event`` while the turn is alive; raise at once when the turn failed, or after ``timeout``."""
    from dualpath.errors import PeerTimeout

    if event.is_set():
        return
    async with anyio.create_task_group() as tg:

        async def _watch_fail() -> None:
            await turn.failed.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(_watch_fail)
        with anyio.move_on_after(timeout):
            await event.wait()
        tg.cancel_scope.cancel()
    if turn.error is not None:
        turn.check()
    if not event.is_set():
        raise PeerTimeout(f"turn {turn.rid}: {what} did not happen within {timeout:g} s")


def unwrap(exc: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
