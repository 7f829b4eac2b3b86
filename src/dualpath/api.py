"""The front door for research code: build a cluster from a config, run turns, run workloads, sync or async.

Everything here is re-exported by :mod:`dualpath`. The objects underneath stay usable on their own
(:class:`~dualpath.cluster.Cluster`, :class:`~dualpath.scheduler.driver.SchedulerDriver`,
:func:`~dualpath.storage.create_storage`, :func:`~dualpath.transports.create_transport`); this module only wires
them together the way ``dualpath run`` does, so a script does not have to copy the runtime's internals.

* :class:`AsyncSession` (``async with``) and :class:`Session` (``with``, for scripts and notebooks): a started
  cluster plus a scheduler driver. ``run_turn`` schedules one turn (or runs it on chosen engines and path) and
  returns a :class:`~dualpath.engine.request.TurnResult`.
* :func:`create_cluster`, :func:`create_scheduler`: the two halves, when you drive them yourself.
* :func:`run_workload`: the whole ``dualpath run`` job (policies compared on a workload) without printing.
* :func:`load_tokenizer`: the tokenizer of a Llama-family checkpoint, without loading its weights.
* :func:`run_sync`: run any of the async calls from synchronous code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from dualpath.config import ConfigSource, DualPathConfig, load_config
from dualpath.errors import ConfigError, DualPathError, EngineError, SchedulerError
from dualpath.types import PathKind

if TYPE_CHECKING:
    from dualpath.cluster.runner import Cluster, ModelSource
    from dualpath.engine.request import TurnResult
    from dualpath.runtime.app import RunOutcome
    from dualpath.scheduler.core import GlobalScheduler
    from dualpath.scheduler.driver import SchedulerDriver

T = TypeVar("T")


def _model_section(model: Any, sections: dict[str, Any]) -> Any:
    """``model=`` given as a mapping is the config's ``model`` section (as ``load_config(model=...)`` takes it):
    moved into ``sections``; a model, ``load_model``'s result or a factory is returned as it is."""
    if isinstance(model, Mapping):
        sections["model"] = model
        return None
    return model


def _as_config(config: ConfigSource, sections: Mapping[str, Any]) -> DualPathConfig:
    if isinstance(config, DualPathConfig) and not sections:
        return config.model_copy(deep=True)
    return load_config(config, **sections)


def create_cluster(config: ConfigSource = None, *, model: ModelSource | None = None, **sections: Any) -> Cluster:
    """A (not started) in-process :class:`~dualpath.cluster.Cluster`: ``async with create_cluster(cfg) as c``.

    ``config`` is anything :func:`dualpath.load_config` takes (a :class:`DualPathConfig`, a file, a mapping,
    ``None`` for the library defaults); keyword ``sections`` override it. ``model``: a layer-wise model or a
    factory ``device -> model`` (default: built from ``config.model``, once per device).
    """
    from dualpath.cluster.runner import Cluster

    model = _model_section(model, sections)
    return Cluster(_as_config(config, sections), model=model)


def create_scheduler(
    config: ConfigSource = None,
    *,
    policy: str | Any | None = None,
    bytes_per_token: int | None = None,
    gpu_tokens_per_s: float | None = None,
    cluster: Cluster | None = None,
) -> GlobalScheduler:
    """The pure :class:`~dualpath.scheduler.core.GlobalScheduler` for a config, as ``dualpath run`` builds it.

    Args:
        config: anything :func:`dualpath.load_config` takes.
        policy: a policy name (``dualpath``, ``pe_only``, ...; default ``config.scheduler.policy``) or a
            :class:`~dualpath.scheduler.policies.Policy` object (e.g. your own, see ``docs/library.md``).
        bytes_per_token: KV bytes per token over all layers (default: from ``cluster`` when given, else from the
            synthetic model's config). Sets the scheduler's alpha/beta thresholds in tokens (paper A.4).
        gpu_tokens_per_s: one engine's prefill rate (default: the synthetic model's modelled rate).
        cluster: a built cluster to take ``bytes_per_token`` from.
    """
    from dualpath.runtime.runner import kv_bytes_per_token, scheduler_params
    from dualpath.scheduler.core import GlobalScheduler
    from dualpath.scheduler.policies import get_policy

    cfg = config if isinstance(config, DualPathConfig) else load_config(config)
    if policy is None or isinstance(policy, str):
        try:
            pol = get_policy(policy or cfg.scheduler.policy)
        except SchedulerError as exc:
            raise ConfigError(f"policy: {exc}") from None
    else:
        pol = policy
    if bytes_per_token is None:
        bytes_per_token = (cluster.layout.spec.bytes_per_token if cluster is not None
                           else kv_bytes_per_token(cfg))
    return GlobalScheduler(pol, scheduler_params(cfg, bytes_per_token, gpu_tokens_per_s))


class AsyncSession:
    """A started emulated cluster and a scheduler driver: ``async with AsyncSession(cfg) as s: await s.run_turn()``.

    The policy's settings are applied as ``dualpath run`` applies them (layer-wise prefill, the compute quota of
    the DualPath scheduler, unlimited links for ``oracle``). With the synthetic model, torch runs one intra-op
    thread while the session is open (restored on exit), as ``dualpath run`` does: the engines issue many small
    tensor ops from one event loop, where a thread pool only adds contention (about 3x slower on 2 loaded cores).

    Args:
        config: anything :func:`dualpath.load_config` takes; keyword ``sections`` override it.
        policy: a policy name (default ``config.scheduler.policy``).
        model: a layer-wise model or a factory ``device -> model`` (default: built from ``config.model``).
        scheduler: your own :class:`~dualpath.scheduler.core.GlobalScheduler` (e.g. a subclass), or a factory
            ``cluster -> scheduler``; default :func:`create_scheduler` for ``policy``.
    """

    def __init__(self, config: ConfigSource = None, *, policy: str | None = None,
                 model: ModelSource | None = None,
                 scheduler: GlobalScheduler | Callable[[Cluster], GlobalScheduler] | None = None,
                 **sections: Any) -> None:
        from dualpath.runtime.runner import policy_config
        from dualpath.scheduler.policies import POLICIES

        model = _model_section(model, sections)
        if policy is not None and not isinstance(policy, str):
            raise ConfigError(f"policy: a policy name ({', '.join(POLICIES)}); for a Policy object of your own "
                              "pass scheduler=create_scheduler(cfg, policy=your_policy)")
        base = _as_config(config, sections)
        self.policy = policy or base.scheduler.policy
        try:
            self.config = policy_config(base, self.policy, None)
        except SchedulerError as exc:
            raise ConfigError(f"policy: {exc}") from None
        self._model = model
        self._scheduler = scheduler
        self._cluster: Cluster | None = None
        self._driver: SchedulerDriver | None = None
        self._threads: Any = None

    @property
    def cluster(self) -> Cluster:
        """The running :class:`~dualpath.cluster.Cluster` (its links, storage, engines, ``lookup``)."""
        if self._cluster is None:
            raise EngineError("the session is not started (use 'async with' / 'with')")
        return self._cluster

    @property
    def driver(self) -> SchedulerDriver:
        """The running :class:`~dualpath.scheduler.driver.SchedulerDriver` (``stats``, ``scheduler``)."""
        if self._driver is None:
            raise EngineError("the session is not started (use 'async with' / 'with')")
        return self._driver

    async def __aenter__(self) -> AsyncSession:
        from dualpath.cluster.runner import Cluster
        from dualpath.runtime.runner import limit_torch_threads
        from dualpath.scheduler.driver import SchedulerDriver

        threads = limit_torch_threads(self.config.model.kind == "synthetic" and self._model is None)
        threads.__enter__()
        try:
            cluster = Cluster(self.config, model=self._model)
            await cluster.__aenter__()
        except BaseException:
            threads.__exit__(None, None, None)
            raise
        try:
            if self._scheduler is None:
                sched = create_scheduler(self.config, policy=self.policy, cluster=cluster)
            elif callable(self._scheduler):
                sched = self._scheduler(cluster)
            else:
                sched = self._scheduler
            driver = SchedulerDriver(cluster, sched, fetch_interval_s=self.config.scheduler.fetch_interval_s,
                                     max_request_tokens=self.config.cluster.kv_pool_tokens,
                                     inflight_prefix_min_tokens=self.config.scheduler.inflight_prefix_min_tokens,
                                     inflight_prefix_wait_s=self.config.scheduler.inflight_prefix_wait_s,
                                     work_ranking=self.config.scheduler.work_ranking)
            await driver.__aenter__()
        except BaseException:
            await cluster.__aexit__(None, None, None)
            threads.__exit__(None, None, None)
            raise
        self._cluster, self._driver, self._threads = cluster, driver, threads
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        driver, cluster, threads = self._driver, self._cluster, self._threads
        self._driver = self._threads = None
        try:
            if driver is not None:
                await driver.__aexit__(None, None, None)
        finally:
            try:
                if cluster is not None:
                    await cluster.__aexit__(None, None, None)
            finally:
                if threads is not None:
                    threads.__exit__(None, None, None)

    async def run_turn(
        self,
        prompt_ids: Sequence[int],
        gen_tokens: int = 16,
        *,
        session: Any = 0,
        path: PathKind | str | None = None,
        pe: int = 0,
        de: int = 0,
        pe_blocks: int | None = None,
        salt: str | None = None,
    ) -> TurnResult:
        """Run one turn: prefill ``prompt_ids`` (the whole context plus the new tokens), generate ``gen_tokens``.

        With ``path=None`` (default) the global scheduler picks the engines and the read side; with ``path``
        (``"pe"``, ``"de"``, ``"split"``, ``"recompute"``) the turn runs on engines ``pe``/``de`` with that path
        (``pe_blocks``: for ``split``, the hit blocks read on the PE side). Returns when the last token is out and
        its KV blocks are persisted, so the next turn's prompt ``prompt_ids + result.tokens + ...`` hits them.
        ``salt``: a cache salt (vLLM's ``cache_salt``): the turn shares stored KV only with turns of the same salt.
        """
        from dualpath.cluster.runner import path_kind, token_ids
        from dualpath.engine.request import unwrap

        try:
            if path is None:  # (checked here: the driver keys the prompt before a cluster sees it)
                return await self.driver.run_turn(session, token_ids(prompt_ids), gen_tokens, salt=salt)
            return await self.cluster.run_turn(session, prompt_ids, gen_tokens, pe, de, path_kind(path), pe_blocks,
                                               salt=salt)  # (which checks the prompt itself)
        except BaseException as exc:  # a task group's failure: the DualPathError that caused it, catchable
            leaf = unwrap(exc)
            if leaf is not exc and isinstance(leaf, DualPathError):
                raise leaf from exc
            raise

    def lookup(self, prompt_ids: Sequence[int], salt: str | None = None) -> int:
        """Tokens of ``prompt_ids`` whose KV is stored now (what a turn would hit; at least one is computed), under
        cache ``salt``."""
        return self.cluster.lookup(prompt_ids, salt)

    def link_bytes(self) -> dict[str, int]:
        """Bytes charged so far to each emulated link (``pnode0.snic.read``, ``de0.cnic.in``, ...)."""
        return {name: int(sum(link.stats.bytes.values())) for name, link in self.cluster.links().items()}

    def io_stats(self) -> dict[str, int]:
        """Bytes really moved so far by storage and transports (beside the emulated links' charges)."""
        return self.cluster.io_stats()


class Session:
    """The synchronous :class:`AsyncSession` for scripts and notebooks: ``with Session(cfg) as s: s.run_turn(..)``.

    The cluster runs on an event loop in a background thread (an anyio blocking portal); every method blocks
    until its result is ready. Arguments are those of :class:`AsyncSession`.
    """

    def __init__(self, config: ConfigSource = None, *, policy: str | None = None,
                 model: ModelSource | None = None,
                 scheduler: GlobalScheduler | Callable[[Cluster], GlobalScheduler] | None = None,
                 **sections: Any) -> None:
        self._async = AsyncSession(config, policy=policy, model=model, scheduler=scheduler, **sections)
        self._portal_cm: Any = None
        self._portal: Any = None
        self._session_cm: Any = None

    @property
    def config(self) -> DualPathConfig:
        return self._async.config

    @property
    def policy(self) -> str:
        return self._async.policy

    @property
    def cluster(self) -> Cluster:
        return self._async.cluster

    def open(self) -> Session:
        """Start the cluster (``with Session(...)`` does it for you)."""
        from anyio.from_thread import start_blocking_portal

        if self._portal is not None:
            return self
        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        try:
            self._session_cm = self._portal.wrap_async_context_manager(self._async)
            self._session_cm.__enter__()
        except BaseException as exc:
            self._portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            self._portal = self._portal_cm = self._session_cm = None
            raise
        return self

    def close(self) -> None:
        """Stop the cluster and its event loop thread. Safe to call twice."""
        if self._portal is None:
            return
        try:
            self._session_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)
            self._portal = self._portal_cm = self._session_cm = None

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._portal is None:
            raise EngineError("the session is not started (use 'with Session(...) as s' or s.open())")
        return self._portal.call(fn, *args)  # type: ignore[no-any-return]

    def run_turn(self, prompt_ids: Sequence[int], gen_tokens: int = 16, *, session: Any = 0,
                 path: PathKind | str | None = None, pe: int = 0, de: int = 0,
                 pe_blocks: int | None = None, salt: str | None = None) -> TurnResult:
        """Run one turn and block until it is done: prefill ``prompt_ids`` (the whole context plus the new tokens;
        a list, a 1-D tensor or a tokenizer's output), generate ``gen_tokens``; the engines and read side are the
        scheduler's with ``path=None``, else ``pe``/``de`` with that path. As :meth:`AsyncSession.run_turn`."""

        async def call() -> TurnResult:
            return await self._async.run_turn(prompt_ids, gen_tokens, session=session, path=path, pe=pe, de=de,
                                              pe_blocks=pe_blocks, salt=salt)

        return self._call(call)

    def lookup(self, prompt_ids: Sequence[int], salt: str | None = None) -> int:
        """See :meth:`AsyncSession.lookup`."""

        async def call() -> int:
            return self._async.lookup(prompt_ids, salt)

        return self._call(call)

    def link_bytes(self) -> dict[str, int]:
        """See :meth:`AsyncSession.link_bytes`."""

        async def call() -> dict[str, int]:
            return self._async.link_bytes()

        return self._call(call)

    def io_stats(self) -> dict[str, int]:
        """See :meth:`AsyncSession.io_stats`."""

        async def call() -> dict[str, int]:
            return self._async.io_stats()

        return self._call(call)


def run_sync(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run the async function ``fn(*args)`` to completion from synchronous code (a new event loop).

    Use it for one-shot async work (``run_sync(main)``); for a cluster that stays up between calls use
    :class:`Session`. Inside a running event loop (a Jupyter cell) use ``await`` instead.
    """
    import anyio

    return anyio.run(fn, *args)


def run_workload(
    config: ConfigSource = None,
    policies: Sequence[str] | None = None,
    *,
    trace: str | Path | None = None,
    trace_format: str | None = None,
    agents: int | None = None,
    preset: str = "demo",
    progress: bool = False,
    **sections: Any,
) -> RunOutcome:
    """The ``dualpath run`` job as a function: each policy on a fresh cluster, the same workload, no printing.

    Args:
        config: anything :func:`dualpath.load_config` takes, merged over ``preset`` (default ``"demo"``: the
            command's I/O-bound 1P1D cluster; ``"library"``: the library defaults). A :class:`DualPathConfig` is
            used as it is.
        policies: policy names (default ``pe_only`` and ``dualpath``; ``"ladder"``: the whole ablation).
        trace: a trace file, as the command's ``--trace``.
        trace_format: ``auto`` (the default), ``jsonl``, ``mooncake``, ``bailian``, ``csv``, ``sharegpt`` or
            ``weka``, as ``--trace-format``.
        agents: the number of agents, as ``--agents``.
        progress: show the progress lines on stderr.

    Returns:
        a :class:`~dualpath.runtime.app.RunOutcome`: ``summaries`` (per policy), ``rows()`` (flat figures, one
        dict per policy), ``turns()`` (one dict per turn), ``report()`` (the command's text).
    """
    from dualpath.runtime.app import RunRequest, execute

    if isinstance(config, DualPathConfig) and not sections:
        cfg: DualPathConfig = config
    else:
        cfg = load_config(config, preset=preset, **sections)
    req = RunRequest(config=cfg, policies=list(policies) if policies else None,
                     trace=None if trace is None else str(trace), trace_format=trace_format, agents=agents,
                     progress=progress)
    return execute(req)


def load_tokenizer(model: Any = None) -> Any:
    """The Hugging Face tokenizer of a Llama-family model, without loading the model's weights.

    ``model``: a :class:`DualPathConfig` or its ``model`` section (``kind: llama``), a safetensors directory or
    a ``.gguf`` file, or ``None`` for the embedded SmolLM2-135M-Instruct. Needs the ``model`` extra.

    Raises:
        ModelError: the checkpoint has no tokenizer, or ``transformers`` is not installed.
        ConfigError: the config names the synthetic model (it has no tokenizer).
    """
    from dualpath.errors import ModelError
    from dualpath.model.loader import load_tokenizer as _load

    if isinstance(model, DualPathConfig):
        model = model.model
    path = model
    if model is not None and hasattr(model, "kind"):
        if model.kind != "llama":
            raise ConfigError(f"model.kind: a {model.kind!r} model has no tokenizer (use kind: llama)")
        path = model.path
    from dualpath.model.embedded import checkpoint_path

    tok = _load(checkpoint_path(path))
    if tok is None:
        raise ModelError(f"{path}: no tokenizer found (or transformers is not installed: pip install dualpath[model])")
    return tok
