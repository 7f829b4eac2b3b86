"""The in-process cluster: engines as async actors on this machine's devices, links emulated.

``P = prefill_nodes * engines_per_node`` prefill engines ``pe0..`` and ``D = decode_nodes * engines_per_node``
decode engines ``de0..``; engine ``r`` of a role sits on node ``r // engines_per_node``. Links: one storage NIC
per node, per direction (``pnode<i>.snic.read``/``.write``, ``dnode<i>.snic.*``, ``snic_gbps``), one compute
NIC per engine per direction (``pe<r>.cnic.in``/``.out``, ``cnic_gbps``). One storage instance (shared: the
paper's distributed file system) and one transport endpoint per engine (named like the engine).

The life of a turn (:meth:`Cluster.run_turn`):

1. validate (context length, token ids, pool/host/scratch sizes) -- errors before any work;
2. key the prompt's Full Blocks and look up the stored prefix (capped so at least one token is computed);
   plan the sides: PE path reads ``[0, stored)`` on the PE node, DE path on the DE node, split the first
   ``pe_blocks`` on the PE node and the rest on the DE node, recompute reads nothing;
3. both sides read concurrently; ``hit`` = the longest prefix read correctly (corrupt/missing blocks shrink it);
4. the DE exposes landings for the rows it lacks; the PE runs the turn in a layer-wise forward batch; on the DE
   path the DE streams layer ``l``'s hit blocks once the PE exposes that layer (a bounded window ahead);
5. after the PE's last layer the first token is known; the DE copies the prompt KV into its pool (H2D),
   persists the prompt's new Full Blocks, and decodes the turn in its continuous batch, persisting each block
   that fills; the turn returns once its blocks are persisted and its pool pages freed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
import numpy as np
import torch

from dualpath.config import DualPathConfig
from dualpath.engine.base import EngineContext
from dualpath.engine.decode import DecodeEngine, DecodeSeq
from dualpath.engine.grammar import tokenizer_source
from dualpath.engine.host_buffer import tokens_that_fit
from dualpath.engine.links import LinkSet
from dualpath.engine.model_api import LayerwiseModel, LlamaAdapter
from dualpath.engine.prefill import PrefillEngine
from dualpath.engine.request import Turn, TurnResult, unwrap, wait_event
from dualpath.engine.sampling import SamplingParams
from dualpath.engine.work import PrefillWork
from dualpath.errors import ConfigError, EngineError, ModelError, StorageError, TransportError
from dualpath.kv.keys import BlockKey, BlockKeyer, KeyNamespace
from dualpath.kv.layout import KVLayout
from dualpath.scheduler.state import EngineSnapshot
from dualpath.storage.base import Storage
from dualpath.traffic import Link
from dualpath.transports.base import Transport
from dualpath.types import EngineId, PathKind, Role, TokenLogprob

from .devices import resolve_devices

log = logging.getLogger("dualpath.cluster")

ModelSource = LayerwiseModel | Callable[[torch.device], LayerwiseModel] | torch.nn.Module | tuple[Any, Any]


def _module_device(m: torch.nn.Module) -> torch.device | None:
    p = next(m.parameters(), None)
    return None if p is None else p.device


def path_kind(path: PathKind | str) -> PathKind:
    """``path`` as a :class:`PathKind`; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return PathKind(path)
    except ValueError:
        raise ConfigError(f"path: {path!r} is not one of {', '.join(p.value for p in PathKind)}") from None


def token_ids(prompt_ids: Any) -> list[int]:
    """A prompt as a list of token ids: a sequence, a 1-D (or one-row) tensor or array, or a tokenizer's output
    (``{"input_ids": ...}``, what ``apply_chat_template`` returns in transformers 5); a :class:`ModelError` naming
    ``prompt_ids`` for text, non-integers or negative ids (tokenize text first: :func:`dualpath.load_tokenizer`)."""
    if isinstance(prompt_ids, str | bytes):
        raise ModelError("prompt_ids: token ids are needed, not text (tokenize it: dualpath.load_tokenizer)")
    if isinstance(prompt_ids, Mapping) and "input_ids" in prompt_ids:
        prompt_ids = prompt_ids["input_ids"]
    if isinstance(prompt_ids, torch.Tensor | np.ndarray):
        if prompt_ids.ndim == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.ndim != 1:
            raise ModelError(f"prompt_ids: one prompt's token ids are needed, got shape {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    elif prompt_ids and isinstance(prompt_ids, Sequence) and isinstance(prompt_ids[0], list) \
            and len(prompt_ids) == 1:
        prompt_ids = prompt_ids[0]  # (a batch of one)
    out: list[int] = []
    for i, t in enumerate(prompt_ids):
        if isinstance(t, bool) or not isinstance(t, int | np.integer) and not (
                isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point()):
            raise ModelError(f"prompt_ids[{i}]: {t!r} is not a token id (an integer)")
        v = int(t)
        if v < 0:
            raise ModelError(f"prompt_ids[{i}]: token ids are non-negative, got {v}")
        out.append(v)
    return out


def build_model(config: DualPathConfig, device: torch.device) -> LayerwiseModel:
    """The model ``config.model`` names, on ``device``."""
    mc = config.model
    if mc.kind == "synthetic":
        from dualpath.model.synthetic import SyntheticModel

        return SyntheticModel(mc, device)
    from dualpath.model.loader import load_model

    model, _tok = load_model(mc, device, with_tokenizer=False)
    return LlamaAdapter(model, config.cluster.block_tokens, time_model=mc.time_model,
                        time_budget_s=mc.time_model_budget_s)


class Cluster:
    """An emulated prefill/decode cluster in this process: its engines (one per device of ``cluster.devices``),
    their host buffers and links, storage and transport, built from a config (anything :func:`dualpath.load_config`
    takes). Use as ``async with Cluster(config) as cluster: await cluster.run_turn(...)``; the module docstring
    says how a turn runs.

    ``model``: a :class:`LayerwiseModel` (shared by every engine on the same device), a model from
    :func:`dualpath.load_model` (or its ``(model, tokenizer)`` result), or a factory ``device -> model``; default:
    built from ``config.model``.
    """

    def __init__(self, config: DualPathConfig | Any, *, model: ModelSource | None = None) -> None:
        if not isinstance(config, DualPathConfig):  # a file, a mapping: what load_config takes
            from dualpath.config import load_config

            config = load_config(config)
        self.config = config
        cc = config.cluster
        self.n_pe = cc.prefill_nodes * cc.engines_per_node
        self.n_de = cc.decode_nodes * cc.engines_per_node
        self.devices = resolve_devices(cc.devices, self.n_pe + self.n_de)  # ConfigError before anything else
        self._models: dict[torch.device, LayerwiseModel] = {}
        self._model_source = model
        first = self._model_for(self.devices[0])
        self.layout = KVLayout(first.kv_spec, cc.block_tokens)
        self.namespace = KeyNamespace.for_layout(first.fingerprint, self.layout)
        self.keyer = BlockKeyer(self.namespace)
        self.model_context = first.max_context
        #: the longest turn served: the model's context, cut to the prompt whose KV a host buffer holds
        self.max_context = min(first.max_context,
                               tokens_that_fit(cc.host_buffer_bytes, self.layout.full_block_bytes, cc.block_tokens))
        self.vocab_size = first.vocab_size
        self.linkset = LinkSet(cc.kv_share)
        self.storage: Storage | None = None
        self.transports: dict[str, Transport] = {}
        self.pes: list[PrefillEngine] = []
        self.des: list[DecodeEngine] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._fabric: Any = None
        self._started = False
        self.failed_turns = 0
        self._sent_before_close: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: Any = None, *, model: ModelSource | None = None) -> Cluster:
        """A (not started) cluster from a :class:`DualPathConfig`, a config file path, a mapping of sections or
        ``None`` (the library defaults), read as :func:`dualpath.load_config` reads them."""
        if not isinstance(config, DualPathConfig):
            from dualpath.config import load_config

            config = load_config(config)
        return cls(config, model=model)

    def _model_for(self, device: torch.device) -> LayerwiseModel:
        if device not in self._models:
            src = self._model_source
            if isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], torch.nn.Module):
                src = src[0]  # load_model's (model, tokenizer)
            if src is None:
                m = build_model(self.config, device)
            elif isinstance(src, LayerwiseModel):
                m = src if src.device == device else src.with_device(device)
            elif isinstance(src, torch.nn.Module):  # a model load_model built: driven layer by layer
                moved = src if _module_device(src) == device else src.to(device)
                m = LlamaAdapter(moved, self.config.cluster.block_tokens)
            elif isinstance(src, Mapping):
                raise ConfigError("model=: a mapping is a config section; give it to load_config (or as the "
                                  "keyword section of create_cluster / Session); model= takes a model, "
                                  "load_model's result, or a factory device -> model")
            elif callable(src):
                m = src(device)
            else:
                raise ConfigError(f"model=: expected a model, load_model's result or a factory device -> model, "
                                  f"got {type(src).__name__}")
            self._models[device] = m
        return self._models[device]

    def prefill_tokens_per_s(self, new: int = 1024) -> float | None:
        """One PE's predicted prefill rate on ``new`` fresh tokens (for Algorithm 1's beta), or None
        when the model predicts no time. A real model may calibrate its time model here (blocking, bounded)."""
        m = self._model_for(self.devices[0])
        return m.prefill_tokens_per_s(min(new, self.max_context))

    # --- life cycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        from dualpath.storage import create_storage
        from dualpath.transports import create_transport

        cfg, cc = self.config, self.config.cluster
        for role, nodes in (("pnode", cc.prefill_nodes), ("dnode", cc.decode_nodes)):
            for i in range(nodes):
                self.linkset.add_link(f"{role}{i}.snic.read", cc.snic_gbps)
                self.linkset.add_link(f"{role}{i}.snic.write", cc.snic_gbps)
        names = [f"pe{r}" for r in range(self.n_pe)] + [f"de{r}" for r in range(self.n_de)]
        for name in names:
            self.linkset.add_link(f"{name}.cnic.in", cc.cnic_gbps)
            self.linkset.add_link(f"{name}.cnic.out", cc.cnic_gbps)
        self.storage = create_storage(cfg.storage, self.layout, self.namespace)
        await self.storage.start()
        try:
            if cfg.transport.kind in ("loopback", "faults"):
                from dualpath.transports.loopback import LoopbackFabric

                self._fabric = LoopbackFabric()
            for name in names:
                t = create_transport(cfg.transport, name, fabric=self._fabric)
                await t.start()
                self.transports[name] = t
            for a in names:
                for b in names:
                    if a != b and a[:2] != b[:2]:
                        await self.transports[a].connect(b, self.transports[b].address)
            for i, name in enumerate(names):
                role = Role.PREFILL if name.startswith("pe") else Role.DECODE
                rank = int(name[2:])
                node = rank // cc.engines_per_node
                snic = f"{'pnode' if role is Role.PREFILL else 'dnode'}{node}.snic"
                self.linkset.add_engine(name, snic, f"{name}.cnic")
                ctx = EngineContext(cc, self.devices[i], self._model_for(self.devices[i]), self.layout,
                                    self.keyer, self.storage, self.transports[name], self.linkset,
                                    tokenizer_source(self.config))
                eid = EngineId(role, rank, node)
                if role is Role.PREFILL:
                    self.pes.append(PrefillEngine(eid, ctx))
                else:
                    self.des.append(DecodeEngine(eid, ctx))
            if cc.prefill_quota_s is not None:  # the quota needs the model's predicted time: calibrate it now
                for m in {id(pe.model): pe.model for pe in self.pes}.values():
                    await anyio.to_thread.run_sync(m.predict_prefill_s, 0, 1)
            for e in [*self.pes, *self.des]:
                await e.start()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
            for e in [*self.pes, *self.des]:
                self._tg.start_soon(e.run)
        except BaseException:
            await self._close_io()
            raise
        self._started = True

    async def close(self) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None
        await self._close_io()
        self._started = False

    async def _close_io(self) -> None:
        for name, t in self.transports.items():
            self._sent_before_close[name] = self._sent_before_close.get(name, 0) + t.stats.bytes_sent
        for t in self.transports.values():
            with anyio.CancelScope(shield=True):
                await t.close()
        self.transports.clear()
        if self.storage is not None:
            with anyio.CancelScope(shield=True):
                await self.storage.close()

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def work_predictor(self) -> PrefillWork | None:
        """Have every PE track and report its predicted work (:mod:`dualpath.engine.work`) and return the predictor
        for ``GlobalScheduler.pe_work`` (the first PE's); None, and nothing changes, when the model predicts no
        time. Blocking (a real model's time model may calibrate first): call it from a thread."""
        if not self.pes:
            return None
        works = []
        for pe in self.pes:
            tm = pe.model.layer_time_model()
            if tm is None:
                return None
            works.append(PrefillWork.for_engine(tm, self.config.cluster, self.layout.spec.bytes_per_token))
        for pe, w in zip(self.pes, works, strict=True):
            pe.work_model = w
        return works[0]

    # --- observation ---------------------------------------------------------------------------------------
    def snapshots(self) -> tuple[list[EngineSnapshot], list[EngineSnapshot]]:
        return [e.snapshot() for e in self.pes], [e.snapshot() for e in self.des]

    def links(self) -> dict[str, Link]:
        """Every emulated link by name (``pnode0.snic.read``, ``pe0.cnic.in``, ...): counters, timelines."""
        return dict(self.linkset.links)

    def link_stats(self) -> dict[str, dict[str, Any]]:
        return self.linkset.stats()

    def io_stats(self) -> dict[str, int]:
        """Bytes really moved (not the bytes charged to emulated links): ``storage_read``/``storage_written``
        by the storage backend, ``transport_sent`` by every engine's transport endpoint. Kept after close."""
        st = self.storage.stats() if self.storage is not None else None
        sent = dict(self._sent_before_close)
        for name, t in self.transports.items():
            sent[name] = sent.get(name, 0) + t.stats.bytes_sent
        return {
            "storage_read": st.bytes_read if st is not None else 0,
            "storage_written": st.bytes_written if st is not None else 0,
            "transport_sent": sum(sent.values()),
        }

    def lookup(self, prompt_ids: Sequence[int], salt: str | None = None) -> int:
        """Hit tokens a turn with this prompt (and cache ``salt``) would get now (stored prefix, at least one token
        left to compute)."""
        keys, usable = self.prompt_keys(prompt_ids, salt)
        return self.stored_blocks(keys[:usable]) * self.layout.block_tokens

    @property
    def block_tokens(self) -> int:
        """Tokens per Full Block."""
        return self.layout.block_tokens

    @property
    def persists(self) -> bool:
        """Whether decode engines store prompts' Full Blocks (``cluster.persist``)."""
        return bool(self.config.cluster.persist)

    def prompt_keys(self, prompt_ids: Sequence[int], salt: str | None = None) -> tuple[list[BlockKey], int]:
        """The keys of a prompt's Full Blocks (those its decode engine stores; ``salt``: the request's cache
        salt), and how many of them a turn may hit (at least one token is left to compute)."""
        keys = self.keyer.keys(list(prompt_ids), salt=salt)
        return keys, min(len(keys), max(0, (len(prompt_ids) - 1) // self.layout.block_tokens))

    def stored_blocks(self, keys: Sequence[BlockKey]) -> int:
        """How many of ``keys``, from the first, are stored now."""
        assert self.storage is not None, "start the cluster first"
        return self.storage.lookup(keys)

    # --- validation ----------------------------------------------------------------------------------------
    def _context_hint(self) -> str:
        """What sets the context (the knob to turn): the host buffer where it binds, else a real model's own."""
        if self.max_context < self.model_context:
            return (f" (cluster.host_buffer_bytes = {self.config.cluster.host_buffer_bytes} holds the KV of "
                    f"{self.max_context} prompt tokens of this model, whose own context is {self.model_context}; "
                    "raise it for longer turns)")
        first = next(iter(self._models.values()), None)
        spec = getattr(getattr(first, "model", None), "spec", None)
        if spec is None or not hasattr(spec, "context_limit") or spec.context_limit != self.max_context:
            return ""
        from dualpath.model.spec_common import context_note

        return f" ({context_note(spec)})"

    def check_turn(self, prompt_ids: Sequence[int], gen_tokens: int, pe: int, de: int) -> None:
        """Every error a turn can be refused for, raised before any work starts."""
        n = len(prompt_ids)
        if n == 0:
            raise ModelError("a turn needs at least one prompt token")
        if gen_tokens < 1:
            raise ModelError(f"gen_tokens must be >= 1, got {gen_tokens}")
        if n + gen_tokens > self.max_context:
            raise ModelError(
                f"turn of {n} prompt + {gen_tokens} generated tokens = {n + gen_tokens} exceeds the model's "
                f"context of {self.max_context} tokens{self._context_hint()}"
            )
        lo, hi = min(prompt_ids), max(prompt_ids)
        if lo < 0 or hi >= self.vocab_size:
            raise ModelError(f"token id out of range [0, {self.vocab_size}): min {lo}, max {hi}")
        if not 0 <= pe < self.n_pe:
            raise EngineError(f"no prefill engine {pe} (cluster has {self.n_pe})")
        if not 0 <= de < self.n_de:
            raise EngineError(f"no decode engine {de} (cluster has {self.n_de})")
        self.pes[pe].check_fits(n)
        self.des[de].check_fits(n, gen_tokens)  # (the host buffer is in max_context: tokens_that_fit)

    # --- turns ---------------------------------------------------------------------------------------------
    async def run_turn(
        self,
        session: Any,
        prompt_ids: Sequence[int],
        gen_tokens: int,
        pe: int = 0,
        de: int = 0,
        path: PathKind | str = PathKind.PE,
        pe_blocks: int | None = None,
        *,
        sampling: SamplingParams | None = None,
        on_token: Callable[[int], None] | None = None,
        on_logprob: Callable[[TokenLogprob], None] | None = None,
        on_stored: Callable[[], None] | None = None,
        salt: str | None = None,
    ) -> TurnResult:
        """Run one turn (the full prompt: context + appended tokens) and return its tokens and timings.

        ``sampling``: how the decode engine picks tokens (default greedy; see :mod:`dualpath.engine.sampling`);
        ``on_token``: called with each token as the decode engine produces it (streaming); with
        ``sampling.logprobs`` set, ``on_logprob`` gets each token's :class:`~dualpath.engine.sampling.TokenLogprob`
        just before it (the result's ``logprobs`` holds them all); ``on_stored``: called once the prompt's new Full
        Blocks are stored (or their write failed), typically between the first token and the turn's end: a turn
        that shares this prompt's prefix, sent after it, loads that prefix instead of computing it. ``salt``
        (a cache salt, vLLM's ``cache_salt``): the turn's blocks are keyed apart, so it loads only what turns with
        the same salt stored (:mod:`dualpath.kv.keys`). With ``sampling.prompt_logprobs`` set the turn
        is recomputed (``path`` is ignored) and the result's ``prompt_logprobs`` holds prompt tokens 1 .. n-1's. Cancelling the
        caller cancels the turn on both engines and frees its buffers and pool pages.

        Raises :class:`EngineError` when the turn failed (a transfer failed or timed out, a peer failed); with
        ``cluster.on_transfer_failure = "recompute"`` a turn whose transfer failed is retried once with
        ``path=recompute`` first."""
        if not self._started:
            raise EngineError("the cluster is not started (use 'async with cluster')")
        path = path_kind(path)
        if sampling is not None and sampling.prompt_logprobs is not None:
            path = PathKind.RECOMPUTE  # every prompt position is computed (a loaded position has no logits)
        ids = token_ids(prompt_ids)
        self.check_turn(ids, gen_tokens, pe, de)
        try:
            return await self._run(session, ids, gen_tokens, pe, de, path, pe_blocks, sampling, on_token, on_logprob,
                                   on_stored, salt)
        except EngineError as exc:
            retry = (
                self.config.cluster.on_transfer_failure == "recompute"
                and path is not PathKind.RECOMPUTE
                and isinstance(exc.__cause__, TransportError | StorageError | TimeoutError)
            )
            if not retry:
                raise
            log.warning("turn of %s failed (%s); retrying with recompute", session, exc)
            res = await self._run(session, ids, gen_tokens, pe, de, PathKind.RECOMPUTE, None, sampling, on_token,
                                  on_logprob, on_stored, salt)
            res.retried_recompute = True
            return res

    def _plan(self, ids: list[int], path: PathKind, pe_blocks: int | None,
              salt: str | None = None) -> tuple[list, int, int]:
        assert self.storage is not None
        keys = self.keyer.keys(ids, salt=salt)
        usable = min(len(keys), (len(ids) - 1) // self.layout.block_tokens)
        stored = 0 if path is PathKind.RECOMPUTE else self.storage.lookup(keys[:usable])
        if path is PathKind.PE:
            k = stored
        elif path is PathKind.SPLIT:
            k = stored // 2 if pe_blocks is None else max(0, min(pe_blocks, stored))
        else:
            k = 0
        return keys, stored, k

    async def _run(self, session: str, ids: list[int], gen: int, pe_i: int, de_i: int, path: PathKind,
                   pe_blocks: int | None, sampling: SamplingParams | None = None,
                   on_token: Callable[[int], None] | None = None,
                   on_logprob: Callable[[TokenLogprob], None] | None = None,
                   on_stored: Callable[[], None] | None = None, salt: str | None = None) -> TurnResult:
        keys, stored, k = self._plan(ids, path, pe_blocks, salt)
        turn = Turn(session, ids, gen, pe_i, de_i, path, keys, stored, k, self.layout)
        turn.sampling, turn.on_token, turn.on_logprob, turn.on_stored = sampling, on_token, on_logprob, on_stored
        pe, de = self.pes[pe_i], self.des[de_i]
        pe.assign(turn)
        de.assign(turn)
        pe_assigned = True
        seq: DecodeSeq | None = None
        submitted = False
        try:
            got: dict[str, int] = {}

            async def _read(side: str, eng: PrefillEngine | DecodeEngine) -> None:
                got[side] = await eng.read(turn)

            async with anyio.create_task_group() as tg:
                tg.start_soon(_read, "pe", pe)
                tg.start_soon(_read, "de", de)
            pe_ok, de_ok = got["pe"], got["de"]
            turn.hit_blocks = pe_ok if pe_ok < turn.pe_blocks else turn.pe_blocks + de_ok
            turn.timings.t_read_done = time.perf_counter()
            await de.expose_receive(turn)
            pe.submit(turn)
            submitted = True
            async with anyio.create_task_group() as tg:
                tg.start_soon(_guard, turn, de.stream, turn)
                tg.start_soon(_guard, turn, de.receive, turn)
                tg.start_soon(_guard, turn, wait_event, turn, turn.prefill_done, float("inf"), "prefill")
            turn.check()
            pe.unassign(turn)
            pe_assigned = False
            seq = await de.begin_decode(turn)
            await wait_event(turn, seq.done, float("inf"), "decode")
            turn.timings.t_last_token = time.perf_counter()
            turn.check()
            await de.finish(seq)
            turn.timings.t_done = time.perf_counter()
            return TurnResult(
                rid=turn.rid, session=session, token_ids=list(seq.generated), prompt_tokens=turn.prompt_len,
                hit_tokens=turn.hit_tokens, stored_tokens=stored * self.layout.block_tokens, path=path,
                pe=pe_i, de=de_i, timings=turn.timings, link_bytes=dict(turn.link_bytes),
                logits=list(seq.logits) if self.config.cluster.keep_logits else None,
                logprobs=list(seq.logprobs) if sampling is not None and sampling.logprobs is not None else None,
                prompt_logprobs=list(turn.prompt_lps) if sampling is not None and sampling.prompt_logprobs is not None
                else None,
            )
        except BaseException as exc:
            turn.fail(unwrap(exc))
            with anyio.CancelScope(shield=True):
                await self._cleanup(turn, pe, de, seq, submitted)
            self.failed_turns += 1
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            err = turn.error if turn.error is not None else exc
            if isinstance(err, EngineError | ModelError):
                raise err from None
            raise EngineError(f"turn {turn.rid} of session {session!r} failed: {err}") from err
        finally:
            if pe_assigned:
                pe.unassign(turn)
            de.unassign(turn)

    async def _cleanup(self, turn: Turn, pe: PrefillEngine, de: DecodeEngine, seq: DecodeSeq | None,
                       submitted: bool) -> None:
        """Withdraw every landing of a failed turn, wait until the PE no longer touches it, free its memory."""
        de.cancel_receive(turn)
        for layer in range(self.layout.n_layers):
            pe.ctx.transport.cancel(turn.tag("hit", layer))
        if submitted:
            with anyio.move_on_after(self.config.cluster.deadline_s):
                await turn.pe_released.wait()
        # one-sided transports: no cancelled landing may still be written into once its memory is freed
        await pe.ctx.transport.settle()
        if de.ctx.transport is not pe.ctx.transport:
            await de.ctx.transport.settle()
        pe.release(turn)
        de.release(turn)
        if seq is not None:
            await de.drop(seq)  # (after the decode step holding it, if one is in flight)


async def _guard(turn: Turn, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)``; an error fails the turn (waking every other wait of it) instead of propagating."""
    try:
        await fn(*args)
    except Exception as exc:
        turn.fail(unwrap(exc))
