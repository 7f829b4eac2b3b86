"""The public API of ``dualpath``: what ``__all__`` promises, one result type, one set of config rules.

``PUBLIC`` is the promise. Removing a name from ``dualpath.__all__`` fails this test unless the name moves to
``dualpath._DEPRECATED`` (still importable, with a DeprecationWarning). Adding a name means adding it here.
"""

from __future__ import annotations

import warnings

import pytest

import dualpath
from dualpath.config import DualPathConfig

PUBLIC = {
    "AsyncSession", "BlockKey", "BlockKeyer", "BlockMissing", "CapacityError", "Cluster", "ConfigError", "CorruptBlock",
    "DualPathConfig", "DualPathError", "EngineError", "EngineId", "GlobalScheduler", "KVLayout", "KVSpec",
    "KernelError", "KeyNamespace", "ModelError", "POLICIES", "PathKind", "PeerTimeout", "Policy", "Role",
    "RunOutcome", "RunRequest", "SchedulerDriver", "SchedulerError", "SchedulerParams", "Session", "SimScenario",
    "Storage", "StorageError", "StorageFull", "TrafficClass", "Transport", "TransportClosed", "TransportError",
    "TransportRejected", "TurnResult", "TurnTimings", "WorkloadError", "__version__", "create_cluster",
    "create_scheduler", "create_storage", "create_transport", "execute", "get_policy", "load_config",
    "load_model", "load_tokenizer", "run_sync", "run_workload", "scenario_from_preset", "simulate",
}


def test_no_public_name_disappears_without_a_deprecation() -> None:
    exported = set(dualpath.__all__)
    gone = PUBLIC - exported
    undeclared = gone - set(dualpath._DEPRECATED)
    assert not undeclared, f"removed from dualpath.__all__ without a deprecation: {sorted(undeclared)}"
    new = exported - PUBLIC
    assert not new, f"new public names: add them to PUBLIC in this test (and to docs/library.md): {sorted(new)}"


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in dualpath.__all__:
        obj = getattr(dualpath, name)
        if callable(obj) and not name.startswith("_"):
            assert (obj.__doc__ or "").strip(), f"dualpath.{name} has no docstring"


def test_deprecated_names_warn_and_still_work() -> None:
    for name in dualpath._DEPRECATED:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            obj = getattr(dualpath, name)
        assert obj is not None
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), name
    with pytest.raises(AttributeError):
        dualpath.NoSuchThing  # noqa: B018


def test_one_result_type_for_every_turn_api() -> None:
    from dualpath.cluster.runner import Cluster
    from dualpath.runtime.clients import TurnOutcome, TurnService
    from dualpath.scheduler.driver import SchedulerDriver

    for fn in (Cluster.run_turn, SchedulerDriver.run_turn, TurnService.run_turn, dualpath.Session.run_turn,
               dualpath.AsyncSession.run_turn):
        assert fn.__annotations__["return"] == "TurnResult", fn
    # the deprecated flat constructor builds the same type, with the same derived figures
    o = TurnOutcome(session=1, tokens=[5, 6, 7], prompt_tokens=10, hit_tokens=4, t_submit=1.0, t_first_token=1.5,
                    t_second_token=1.6, t_done=2.5, path="de", bytes={"dnode0.snic.read": 64})
    assert isinstance(o, dualpath.TurnResult)
    assert o.path is dualpath.PathKind.DE and o.tokens == o.token_ids == [5, 6, 7]
    assert o.ttft == pytest.approx(0.5) and o.tpot == pytest.approx(0.5) and o.ttst == pytest.approx(0.1)
    assert o.bytes == o.link_bytes == {"dnode0.snic.read": 64}
    assert o.phases["total"] == pytest.approx(1.5) and o.phases["decode"] == pytest.approx(1.0)


def test_load_config_takes_a_file_a_dict_an_object_or_keywords(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("cluster: {decode_nodes: 2}\n")
    from_file = dualpath.load_config(f, env={})
    from_dict = dualpath.load_config({"cluster": {"decode_nodes": 2}}, env={})
    from_kw = dualpath.load_config(env={}, cluster={"decode_nodes": 2})
    from_obj = dualpath.load_config(from_kw, env={})
    assert from_file == from_dict == from_kw == from_obj
    assert from_obj is not from_kw and from_obj.cluster.decode_nodes == 2
    # later wins: file < environment < overrides < keywords; a list of sources merges in order
    cfg = dualpath.load_config(f, env={"DUALPATH_CLUSTER__DECODE_NODES": "3"}, overrides={"cluster": {"snic_gbps": 2}},
                               cluster={"snic_gbps": 4})
    assert (cfg.cluster.decode_nodes, cfg.cluster.snic_gbps) == (3, 4)
    assert dualpath.load_config([{"cluster": {"decode_nodes": 5}}, f], env={}).cluster.decode_nodes == 2


def test_library_default_and_demo_preset_are_named() -> None:
    from dualpath.runtime.defaults import load_run_config

    lib = dualpath.load_config(env={})
    demo = dualpath.load_config(preset="demo", env={})
    assert lib == DualPathConfig()
    assert demo == load_run_config(None) or demo.storage.kind == load_run_config(None).storage.kind
    assert (demo.storage.kind, demo.cluster.snic_gbps, demo.model.n_layers) == ("posix", 0.01, 4)
    assert (lib.storage.kind, lib.cluster.snic_gbps) == ("memory", 1.0)
    # a config object is taken as it is wherever a path is
    assert load_run_config(lib) == lib
    with pytest.raises(dualpath.ConfigError, match="unknown preset 'nope'; expected one of library, demo"):
        dualpath.load_config(preset="nope", env={})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides": {"cluster": {"decode_nodez": 1}}}, "overrides: cluster.decode_nodez: unknown key"),
        ({"cluster": {"block_tokens": 0}}, "keyword arguments: cluster.block_tokens: Input should be greater"),
        ({"env": {"DUALPATH_CLUSTER__DECODE_NODES": "x"}}, "environment variable DUALPATH_CLUSTER__DECODE_NODES: cluster.decode_nodes:"),
        ({"cluster": {"devices": "cuda"}},
         "keyword arguments: cluster.devices: 'cuda' is not valid: use 'auto', 'cpu', or a list of devices"),
    ],
)
def test_config_errors_name_their_source_and_field(kwargs, message) -> None:
    kwargs.setdefault("env", {})
    with pytest.raises(dualpath.ConfigError) as info:
        dualpath.load_config(**kwargs)
    assert str(info.value).startswith(message), str(info.value)
    assert "<defaults>" not in str(info.value)


def test_config_error_names_the_file(tmp_path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("cluster: {decode_nodez: 1}\n")
    with pytest.raises(dualpath.ConfigError, match=r"bad.yaml: cluster.decode_nodez: unknown key"):
        dualpath.load_config(f, env={})


def test_path_kind_lists_valid_values() -> None:
    assert dualpath.PathKind("de") is dualpath.PathKind.DE
    with pytest.raises(ValueError, match="'decode' is not a valid path; expected one of 'pe', 'de', 'split'"):
        dualpath.PathKind("decode")
    # equal to its value, so it is one dict key with it
    assert {"pe": 1}[dualpath.PathKind.PE] == 1 and str(dualpath.PathKind.SPLIT) == "split"


def test_transport_rejection_is_a_public_transport_error() -> None:
    from dualpath.transports.landing import Rejected

    assert Rejected is dualpath.TransportRejected
    assert issubclass(dualpath.TransportRejected, dualpath.TransportError)


def test_create_scheduler_from_a_config_uses_the_runs_parameters() -> None:
    from dualpath.runtime.runner import kv_bytes_per_token, scheduler_params

    cfg = dualpath.load_config(preset="demo", env={})
    sched = dualpath.create_scheduler(cfg, policy="pe_only")
    assert sched.policy.name == "pe_only"
    assert sched.params == scheduler_params(cfg, kv_bytes_per_token(cfg))
    with pytest.raises(dualpath.ConfigError, match="unknown policy"):
        dualpath.create_scheduler(cfg, policy="nope")


def test_load_tokenizer_refuses_the_synthetic_model() -> None:
    with pytest.raises(dualpath.ConfigError, match="model.kind: a 'synthetic' model has no tokenizer"):
        dualpath.load_tokenizer(dualpath.load_config(env={}))


def test_chat_config_merges_over_chats_defaults_and_says_what_it_overrode(tmp_path) -> None:
    from dualpath.commands.chat import CHAT_DEFAULTS, overridden_defaults

    only_storage = tmp_path / "posix.yaml"
    only_storage.write_text(f"storage: {{kind: posix, root: {tmp_path / 'kv'}}}\n")
    cfg = dualpath.load_config([CHAT_DEFAULTS, only_storage], env={})
    assert cfg.storage.kind == "posix" and cfg.cluster.block_tokens == 16 and cfg.cluster.snic_gbps is None
    assert overridden_defaults(str(only_storage)) == []
    bigger = tmp_path / "bt.yaml"
    bigger.write_text("cluster: {block_tokens: 64}\n")
    assert dualpath.load_config([CHAT_DEFAULTS, bigger], env={}).cluster.block_tokens == 64
    assert overridden_defaults(str(bigger)) == [f"{bigger}: cluster.block_tokens = 64 overrides chat's default 16"]


def test_the_api_reference_covers_every_public_name() -> None:
    from pathlib import Path

    import dualpath.errors

    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    documented = {line.split(":::", 1)[1].strip() for line in text.splitlines() if line.startswith(":::")}
    leaves = {d.rsplit(".", 1)[-1] for d in documented}
    if "dualpath.errors" in documented:
        leaves |= {n for n in dir(dualpath.errors) if not n.startswith("_")}
    missing = [n for n in dualpath.__all__ if n != "__version__" and n not in leaves]
    assert not missing, f"docs/api.md does not document: {missing}"


def test_run_output_says_what_is_real_and_what_is_modelled(tmp_path) -> None:
    import io

    cfg = dualpath.load_config(
        preset="demo", env={}, storage={"kind": "posix", "root": str(tmp_path)},
        model={"n_layers": 2, "decode_step_s": 0.002}, cluster={"snic_gbps": 1.0, "cnic_gbps": 8.0},
        workload={"dataset": "tiny", "n_agents": 1},
    )
    out = io.StringIO()
    res = dualpath.execute(dualpath.RunRequest(config=cfg, policies=["dualpath"], progress=False, out=out))
    text = out.getvalue()
    assert text == res.report() + "\n"  # RunRequest.out receives the report
    header = text.splitlines()[:3]
    assert "1 KV head of dim 32" in header[0] and "1x32" not in text
    assert header[1].startswith("  real:") and f"posix storage under {tmp_path}" in header[1]
    assert header[2].startswith("  modelled:") and "1000 MB/s" in header[2] and "2 ms decode step" in header[2]
    run = res.summaries["dualpath"]
    # every byte storage really read crossed a storage NIC, and nothing else did: the two counts are independent
    assert run["real_storage_read_bytes"] == run["link_storage_read_bytes"] > 0
    assert run["real_transport_bytes"] > 0 and run["link_cnic_bytes"] >= run["real_transport_bytes"]
    assert "storage read: real" in text and "storage read: SNIC links" in text
    row = res.rows()[0]
    assert row["policy"] == "dualpath" and row["real_storage_read_bytes"] == run["real_storage_read_bytes"]
    assert {t["policy"] for t in res.turns()} == {"dualpath"}


def test_session_scheduled_and_direct_turns_return_the_same_result_type_and_tokens() -> None:

    cfg = dualpath.load_config(env={}, model={"n_layers": 2}, cluster={"block_tokens": 16})
    prompt = list(range(1, 120))
    with dualpath.Session(cfg) as s:
        first = s.run_turn(prompt, 6)                        # through the scheduler
        follow = prompt + first.tokens + [3, 4]
        assert s.lookup(follow) == 112                       # the prompt and reply were persisted: 7 blocks
        direct = s.run_turn(follow, 6, path="de")            # on named engines and path
        before = s.link_bytes()
        bpt = s.cluster.layout.spec.bytes_per_token
        assert s.io_stats()["storage_read"] == sum(v for k, v in before.items() if k.endswith("snic.read"))
    assert type(first) is type(direct) is dualpath.TurnResult
    assert first.hit_tokens == 0 and direct.hit_tokens == 112 and direct.path is dualpath.PathKind.DE
    assert first.t_scheduled is not None and direct.t_scheduled is None and first.phases["queue"] >= 0
    assert direct.link_bytes["dnode0.snic.read"] == 112 * bpt and "pnode0.snic.read" not in direct.link_bytes

    async def fresh() -> list[int]:  # the same prompt on a fresh cluster through the low-level API
        async with dualpath.create_cluster(cfg) as cluster:
            r = await cluster.run_turn("x", prompt, 6)
            return r.tokens

    assert dualpath.run_sync(fresh) == first.tokens
    with pytest.raises(dualpath.EngineError, match="not started"):
        s.run_turn(prompt, 1)


def test_session_turns_with_a_cache_salt_share_kv_only_within_it() -> None:
    cfg = dualpath.load_config(env={}, model={"n_layers": 2}, cluster={"block_tokens": 16})
    prompt = list(range(1, 120))
    with dualpath.Session(cfg) as s:
        a = s.run_turn(prompt, 4, salt="lab-a")              # scheduled
        assert s.lookup(prompt, salt="lab-a") == 112 and s.lookup(prompt) == 0 and s.lookup(prompt, "lab-b") == 0
        again = s.run_turn(prompt, 4, salt="lab-a", path="de")  # direct
        other = s.run_turn(prompt, 4, salt="lab-b")
    assert a.hit_tokens == 0 and again.hit_tokens == 112 and other.hit_tokens == 0
    assert a.tokens == again.tokens == other.tokens


@pytest.mark.parametrize("kind", ["loopback", "zmq"])
def test_a_refused_arrival_is_the_same_public_error_on_every_transport(kind: str) -> None:
    import anyio
    import torch

    cfg = dualpath.load_config(env={}, transport={"kind": kind})

    async def main() -> None:
        async with dualpath.create_transport(cfg.transport, "rx") as rx, \
                dualpath.create_transport(cfg.transport, "tx") as tx:
            await tx.connect("rx", rx.address)
            region = rx.register(torch.zeros(64, dtype=torch.uint8))
            rx.expose("t", region, 0, 16)
            with pytest.raises(dualpath.TransportRejected, match="16"):
                await tx.write("rx", "t", torch.ones(64, dtype=torch.uint8), 5.0)

    anyio.run(main)


@pytest.mark.slow
@pytest.mark.model
def test_load_tokenizer_does_not_build_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    import dualpath.model.loader as loader

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("load_tokenizer must not build the model")

    monkeypatch.setattr(loader, "build_model", refuse)
    tok = dualpath.load_tokenizer(dualpath.load_config(env={}, model={"kind": "llama"}))
    ids = tok.encode("The capital of France is", add_special_tokens=False)
    assert tok.decode(ids) == "The capital of France is" and tok.eos_token_id is not None


def test_backends_and_models_from_what_a_config_file_holds(tmp_path) -> None:
    """``create_transport`` and ``create_storage`` take a mapping as a config file's section holds it (the
    backend by its ``kind``); ``load_model`` takes a checkpoint's path alone. A bad value names its field."""
    import anyio
    import torch

    from dualpath.kv.keys import KeyNamespace
    from dualpath.kv.layout import KVLayout, KVSpec
    from dualpath.storage.posix import PosixStorage
    from dualpath.transports.loopback import LoopbackFabric, LoopbackTransport

    fabric = LoopbackFabric()
    t = dualpath.create_transport({"kind": "loopback"}, "a", fabric=fabric)
    assert isinstance(t, LoopbackTransport)
    for bad, field in (({"kind": "rdma"}, "transport.kind"), ({"kind": "zmq", "nope": 1}, "transport.nope"),
                       (7, "transport")):
        with pytest.raises(dualpath.ConfigError, match=rf"^{field}:"):
            dualpath.create_transport(bad, "a")  # type: ignore[arg-type]
    layout = KVLayout(KVSpec.mha(n_layers=2, n_kv_heads=1, head_dim=8, dtype="float32"), block_tokens=4)
    ns = KeyNamespace.for_layout("api-test", layout)
    s = dualpath.create_storage({"kind": "posix", "root": str(tmp_path / "kv"), "io_threads": 2}, layout, ns)
    assert isinstance(s, PosixStorage) and s.config.root == tmp_path / "kv"
    with pytest.raises(dualpath.ConfigError, match=r"^storage\.io_threads:"):
        dualpath.create_storage({"kind": "posix", "root": str(tmp_path), "io_threads": 0}, layout, ns)

    async def roundtrip() -> None:  # the mapping-built backend is the real one: a block written reads back
        keys = dualpath.BlockKeyer(ns).keys(list(range(4)))
        block = (torch.arange(layout.full_block_bytes) % 251).to(torch.uint8).view(1, *layout.full_block_shape)
        async with s:
            await s.write(keys, block)
            out = torch.zeros_like(block)
            await s.read(keys, out)
            assert torch.equal(out, block)

    anyio.run(roundtrip)
    from dualpath.model.embedded import embedded_model_path

    model, tok = dualpath.load_model(str(embedded_model_path()), with_tokenizer=False)
    assert tok is None and model.spec.n_layers == 30
    with pytest.raises(dualpath.ModelError, match="config must be a model config, a mapping or a checkpoint path"):
        dualpath.load_model(3)  # type: ignore[arg-type]
    with pytest.raises(dualpath.ConfigError, match=r"^model\.dtype:"):
        dualpath.load_model({"dtype": "float8"})


def test_what_a_researcher_types_first_works_or_names_the_mistake() -> None:
    """``simulate`` takes a preset's name and one policy name (as ``dualpath simulate --preset P --policy X``
    does): the same result as the scenario built by hand; ``Cluster`` takes what ``load_config`` takes; a typo
    in ``mode`` is refused by name instead of running offline."""
    by_name = dualpath.simulate("tiny", "dualpath")
    by_hand = dualpath.simulate(dualpath.scenario_from_preset("tiny"), ["dualpath"])
    assert [r["policy"] for r in by_name.runs] == ["dualpath"]
    assert by_name.runs[0]["jct_s"] == by_hand.runs[0]["jct_s"] > 0
    with pytest.raises(dualpath.ConfigError, match="expected a SimScenario or a preset's name, got int"):
        dualpath.simulate(3, ["basic"])  # type: ignore[arg-type]
    with pytest.raises(dualpath.ConfigError, match="mode: expected 'offline' or 'online', got 'onlin'"):
        dualpath.scenario_from_preset("tiny", mode="onlin")
    c = dualpath.Cluster({"storage": {"kind": "memory"}, "transport": {"kind": "loopback"}})
    assert c.config.storage.kind == "memory"
    with pytest.raises(dualpath.ConfigError, match="storage"):
        dualpath.Cluster({"storage": {"kind": "s3"}})


def test_a_researchers_wrong_arguments_are_named_errors() -> None:
    """What the library audit found raising plain TypeErrors / ValueErrors or crashing deep inside: each is now a
    DualPathError naming the argument, and the forms the docs suggest work."""
    from dualpath.scheduler.policies import Policy

    with pytest.raises(dualpath.ConfigError, match="policies must be a policy name or a list"):
        dualpath.simulate("tiny", 5)  # type: ignore[arg-type]
    with pytest.raises(dualpath.SchedulerError, match="read_side 'sideways' is not one of"):
        Policy("x", layerwise=False, read_side="sideways", oracle=False, smart_assign=False)  # type: ignore[arg-type]
    with pytest.raises(dualpath.SchedulerError, match="layerwise must be True or False"):
        Policy("x", layerwise=1, read_side="pe", oracle=False, smart_assign=False)  # type: ignore[arg-type]
    with pytest.raises(dualpath.ConfigError, match="policy: unknown policy 'dualpth'"):
        dualpath.Session(policy="dualpth")
    mine = Policy("mine", layerwise=True, read_side="pe", oracle=False, smart_assign=False)
    with pytest.raises(dualpath.ConfigError, match="pass scheduler=create_scheduler"):
        dualpath.Session(policy=mine)  # type: ignore[arg-type]
    # model= as a mapping is the config's model section, as load_config(model=...) takes it
    with dualpath.Session(model={"n_layers": 2}, cluster={"block_tokens": 16}) as s:
        assert s.config.model.n_layers == 2
        prompt = list(range(1, 40))
        assert len(s.run_turn(prompt, 2).token_ids) == 2
        for bad, match in (("hello", "token ids are needed, not text"), ([1, -5, 3], r"prompt_ids\[1\]: token ids are"),
                           ([1.5, 2.0], r"prompt_ids\[0\]: 1.5 is not a token id"),
                           ([1, True], r"prompt_ids\[1\]: True is not a token id")):
            with pytest.raises(dualpath.ModelError, match=match):
                s.run_turn(bad, 2)  # type: ignore[arg-type]
        with pytest.raises(dualpath.ConfigError, match="path: 'xx' is not one of pe, de, split, recompute"):
            s.run_turn(prompt, 2, path="xx")
    with pytest.raises(dualpath.ConfigError, match="model=: expected a model"), \
            dualpath.Session(model=42):  # type: ignore[arg-type]
        pass
