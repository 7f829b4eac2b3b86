"""Random checkpoints for the comparisons against transformers: its own model on random weights, widened so that
every weight matters (transformers initialises small weights, zero biases and unit or zero norms), written by
its own ``save_pretrained``; each family's checkpoint is built once per test session."""

from __future__ import annotations

from typing import Any

import torch

from dualpath.engine.model_api import paged_kv_spec


class Checkpoints:
    """``families``: name -> (config class name, model class name, config kwargs) in ``transformers``."""

    def __init__(self, families: dict[str, tuple[str, str, dict[str, Any]]]) -> None:
        self.families = families
        self._dirs: dict[str, Any] = {}

    def model(self, family: str, seed: int = 0) -> Any:
        import transformers

        cfg_cls, model_cls, kw = self.families[family]
        torch.manual_seed(seed)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "norm_f.weight", "bias")):  # (DBRX's)
                    p.add_(0.1 * torch.randn_like(p))
                else:
                    p.mul_(6.0)
        return hf

    def fixture(self) -> Any:
        """A module-scoped pytest fixture over every family: ``(family, directory, model)``."""
        import pytest

        @pytest.fixture(scope="module", params=list(self.families))
        def ckpt(request: Any, tmp_path_factory: Any) -> tuple[str, Any, Any]:
            d, hf = self.get(request.param, tmp_path_factory)
            return request.param, d, hf

        return ckpt

    def get(self, family: str, factory: Any) -> tuple[Any, Any]:
        """``(directory, model)``: the family's checkpoint written by transformers' save_pretrained."""
        if family not in self._dirs:
            d = factory.mktemp(family)
            hf = self.model(family)
            hf.save_pretrained(d)
            self._dirs[family] = (d, hf)
        return self._dirs[family]


#: a small DeepSeek-V3-style config (MLA with a query LoRA, 2 of 8 experts in two groups, a shared expert), for the
#: families built on it; each test sets its vocabulary and which layers are dense
SMALL_MLA_MOE: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.8, "q_lora_rank": 24, "max_position_embeddings": 256}


def widen_mla_moe(hf: Any) -> Any:
    """Widen transformers' small init of a DeepSeek-style model in place so every weight matters: norms around
    one, other weights times six, the routers' correction biases live (transformers starts them at zero)."""
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(6.0)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return hf


def mla_checkpoint(factory: Any, name: str, model_cls: str, config_cls: str, config: dict[str, Any]) -> tuple[Any, Any]:
    """``(directory, model)``: a DeepSeek-style random model of transformers' ``model_cls`` (seed 0), widened by
    :func:`widen_mla_moe`, written by its ``save_pretrained`` into a fresh directory."""
    import transformers

    torch.manual_seed(0)
    hf = widen_mla_moe(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval())
    d = factory.mktemp(name)
    hf.save_pretrained(d)
    return d, hf


def hf_logits(hf: Any, seq: list[int]) -> torch.Tensor:
    """transformers' logits of a full recompute of ``seq`` (fp32)."""
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


def check_batched_against_hf(ours: Any, hf: Any, seqs: list[list[int]], cuts: tuple[int, int] = (9, 3),
                             atol: float = 2e-4, rtol: float = 1e-4) -> None:
    """Two sequences with different cached prefixes (``cuts``) in one prefill batch over paged KV (one block table
    reversed), then two batched decode steps: every logit row equals transformers' full recompute (within
    ``atol`` / ``rtol``)."""
    from dualpath.model import KVPool, SeqBatch

    bt = 4
    pool = KVPool(paged_kv_spec(ours.spec, bt), num_blocks=24, block_tokens=bt)
    seqs = [list(s) for s in seqs]
    tables = [pool.allocate(8)[::-1], pool.allocate(8)]
    ours(SeqBatch.build([seqs[0][:cuts[0]], seqs[1][:cuts[1]]], [0, 0], tables, bt), pool.layers)
    batch = SeqBatch.build([seqs[0][cuts[0]:], seqs[1][cuts[1]:]], list(cuts), tables, bt)
    got = ours(batch, pool.layers, all_positions=True)
    for b, cut in enumerate(cuts):
        rows = got[int(batch.cu_seqlens_q[b]): int(batch.cu_seqlens_q[b + 1])]
        torch.testing.assert_close(rows, hf_logits(hf, seqs[b])[cut:], atol=atol, rtol=rtol)
    for _ in range(2):
        nxt = [int(hf_logits(hf, s)[-1].argmax()) for s in seqs]
        dl = ours.decode_step(torch.tensor(nxt), torch.tensor([len(s) for s in seqs]),
                              torch.tensor(tables, dtype=torch.int32), pool.layers)
        for b in range(2):
            seqs[b].append(nxt[b])
            torch.testing.assert_close(dl[b], hf_logits(hf, seqs[b])[-1], atol=atol, rtol=rtol)


def bf16_teacher_forced(ours: Any, hf: Any, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our bf16 logits over ``seq`` (a prefill of 11 tokens, a chunk of 5 over that prefix, then teacher-forced
    decode steps over the paged KV) and transformers' bf16 forward of the whole sequence (teacher-forced: a
    near-tie between two greedy ids cannot fork the runs)."""
    from dualpath.model import KVPool, SeqBatch

    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=8, block_tokens=4)
    table = pool.allocate(8)
    rows = [ours(SeqBatch.build([seq[:11]], [0], [table], 4), pool.layers, all_positions=True),
            ours(SeqBatch.build([seq[11:16]], [11], [table], 4), pool.layers, all_positions=True)]
    tables = torch.tensor([table], dtype=torch.int32)
    for p in range(16, len(seq)):
        rows.append(ours.decode_step(torch.tensor([seq[p]]), torch.tensor([p]), tables, pool.layers))
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].float()
    return torch.cat(rows), ref


async def cluster_read_paths(model_cfg: Any, hf: Any, first: list[int], second: list[int], min_hit: int) -> None:
    """A two-turn session through the emulated cluster: the second turn's hit KV (at least ``min_hit`` tokens) is
    read on the PE, on the DE and forwarded layer by layer, split, or recomputed; every path must give the same
    tokens, and those must be transformers' greedy tokens (teacher-forced over the whole session)."""
    import os

    from dualpath.cluster import Cluster
    from dualpath.config import DualPathConfig

    def config() -> DualPathConfig:
        cfg = DualPathConfig()
        cfg.model = model_cfg
        c = cfg.cluster
        c.block_tokens, c.snic_gbps, c.cnic_gbps = 4, None, None
        c.host_buffer_bytes, c.kv_pool_tokens, c.deadline_s = 8 << 20, 256, 30.0
        c.devices = os.environ.get("DUALPATH_TEST_DEVICES", "cpu")
        return cfg

    tokens = {}
    for read_path in ("pe", "de", "split", "recompute"):
        async with Cluster(config()) as c:
            r1 = await c.run_turn("s", first, 4, path="recompute")
            prompt = first + r1.token_ids + second
            r2 = await c.run_turn("s", prompt, 6, path=read_path, pe_blocks=2 if read_path == "split" else None)
        if read_path != "recompute":
            assert r2.hit_tokens == (len(first) + 4) // 4 * 4 >= min_hit
        tokens[read_path] = (r1.token_ids, r2.token_ids)
    assert len({repr(t) for t in tokens.values()}) == 1, tokens
    r1_ids, r2_ids = tokens["de"]
    ids = first + r1_ids + second + r2_ids
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0]
    assert logits[len(first) - 1: len(first) + 3].argmax(-1).tolist() == r1_ids
    assert logits[len(first) + 4 + len(second) - 1:].argmax(-1).tolist() == r2_ids


async def cluster_two_turns(d: Any, hf: Any, vocab: int) -> None:
    """:func:`cluster_read_paths` on the checkpoint in ``d``: a 16-token first turn (random ids below ``vocab``) and
    a 7-token second one, at least 16 tokens hit."""
    from dualpath.model.config import LlamaModelConfig

    first = random_turns(vocab, 9)[0] + random_turns(vocab, 9)[1]
    await cluster_read_paths(LlamaModelConfig(path=str(d), time_model="off"), hf, first, [5, 17, 33, 2, 71, 64, 9],
                             min_hit=16)


def load_checkpoint(d: Any, backend: str = "torch", dtype: str = "float32") -> Any:
    """Our model of the checkpoint in ``d`` (no tokenizer)."""
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    return load_model(LlamaModelConfig(path=str(d), attention_backend=backend, dtype=dtype),  # type: ignore[arg-type]
                      with_tokenizer=False)[0]


def random_turns(vocab: int, seed: int = 0, lens: tuple[int, ...] = (11, 5, 7)) -> list[list[int]]:
    """Turns of random token ids (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def two_sequences(vocab: int) -> list[list[int]]:
    """Two sequences of different lengths (18 and 5 tokens) for the batched comparisons."""
    one, two = random_turns(vocab, 1), random_turns(vocab, 2)
    return [one[0] + one[2], two[1]]


def check_turns_against_hf(ours: Any, hf: Any, turns: list[list[int]]) -> None:
    """Three turns (prefill chunks over a paged prefix, then greedy decode steps): logits at every step and the ids
    equal transformers' with its own cache."""
    from test_deepseek import paged_turns

    got, ref, ids, ref_ids = paged_turns(ours, hf, turns, 7, 4)
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) >= 20 and ids == ref_ids


def check_paged_paths_against_hf(d: Any, hf: Any, vocab: int) -> None:
    """The checkpoint in ``d`` against transformers' ``hf`` on the three paged paths every family shares: turns of
    chunked prefills and greedy decode steps (:func:`check_turns_against_hf`), two sequences batched over different
    cached prefixes (:func:`check_batched_against_hf`) and a two-chunk prefill on the Triton kernels
    (:func:`check_two_chunks_against_hf`)."""
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(vocab, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(vocab))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(vocab, 3), []))


def check_two_chunks_against_hf(ours: Any, hf: Any, seq: list[int], cut: int = 13) -> None:
    """``seq`` prefilled in two chunks over one paged block table (``cut`` tokens, then the rest; one prefill when
    ``cut`` covers it): every logit row equals transformers' full forward (the Triton kernels when ``ours`` runs
    them)."""
    from dualpath.model import KVPool, SeqBatch

    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    parts = [(seq[:cut], 0)] + ([(seq[cut:], cut)] if cut < len(seq) else [])
    got = torch.cat([ours(SeqBatch.build([part], [start], [table], 4), pool.layers, all_positions=True)
                     for part, start in parts])
    torch.testing.assert_close(got, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)


def check_save_reads_back(ours: Any, directory: Any, model_cls: Any, seq: list[int]) -> None:
    """Our ``save_pretrained`` of ``ours`` loads in transformers' ``model_cls`` with no missing or unexpected
    tensor, to the same logits over ``seq``."""
    from dualpath.model.loader import save_pretrained

    save_pretrained(ours, directory)
    hf, info = model_cls.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    check_two_chunks_against_hf(ours, hf.eval(), seq, cut=len(seq))


def routing_margins(hf: Any, seq: list[int], k: int, router_of: Any) -> torch.Tensor:
    """Per token of ``seq``, the smallest gap (relative to the largest logit) between the k-th and the next router
    logit over the MoE layers of transformers' fp32 forward (``router_of(layer)``: the layer's router module, whose
    first output is the router logits; None for a dense layer). Below a few percent, bf16 rounding of the hidden
    state can pick the other expert on either side: bf16 comparisons leave those tokens out."""
    gaps: list[torch.Tensor] = []

    def hook(module: Any, args: Any, out: Any) -> None:
        logits = out[0] if isinstance(out, tuple) else out
        top = logits.float().reshape(-1, logits.shape[-1]).topk(k + 1, dim=-1).values
        gaps.append((top[:, k - 1] - top[:, k]) / top.abs().max(dim=-1).values)

    routers = [r for r in (router_of(layer) for layer in hf.model.layers) if r is not None]
    hooks = [r.register_forward_hook(hook) for r in routers]
    try:
        hf_logits(hf, seq)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(gaps).min(dim=0).values


def check_bf16_as_close_as_transformers(got: torch.Tensor, ref: torch.Tensor, fp32: torch.Tensor,
                                        rows: torch.Tensor | None = None, mean_ratio: float = 1.3,
                                        max_ratio: float | None = 1.5) -> None:
    """Our bf16 logits ``got`` are as close to transformers' fp32 logits ``fp32`` as its own bf16 logits ``ref``
    are (per-row max error: mean within ``mean_ratio`` of its, max within ``max_ratio``), over ``rows`` (all when
    None). For random models whose bf16 rounding alone moves logits by a large part of their range, on both sides."""
    ours_err = (got - fp32).abs().max(dim=1).values
    their_err = (ref - fp32).abs().max(dim=1).values
    if rows is not None:
        ours_err, their_err = ours_err[rows], their_err[rows]
    assert float(ours_err.mean()) <= mean_ratio * float(their_err.mean()), (ours_err, their_err)
    if max_ratio is not None:
        assert float(ours_err.max()) <= max_ratio * float(their_err.max()), (ours_err, their_err)


def prefill_all(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Our logits at every position of each row of ``ids``, the rows prefilled together in one batch."""
    from dualpath.model import KVPool, SeqBatch

    pool = KVPool(paged_kv_spec(model.spec, 4), num_blocks=32, block_tokens=4)
    seqs = [row.tolist() for row in ids]
    batch = SeqBatch.build(seqs, [0] * len(seqs), [pool.allocate(8) for _ in seqs], 4)
    return model(batch, pool.layers, all_positions=True).reshape(len(seqs), ids.shape[1], -1)


def check_fixture_logits(fixture: Any) -> None:
    """A checkpoint fixture written by another tool (``fixture/checkpoint``) gives the logits that tool's side
    recorded beside it (``fixture/reference.safetensors``: ``ids`` and ``logits``), batched, in fp32."""
    from safetensors.torch import load_file

    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    ref = load_file(str(fixture / "reference.safetensors"))
    ours = load_model(LlamaModelConfig(path=str(fixture / "checkpoint"), time_model="off"), with_tokenizer=False)[0]
    assert ref["logits"].abs().max() > 1.0  # (logits of a meaningful size)
    torch.testing.assert_close(prefill_all(ours, ref["ids"]), ref["logits"], atol=2e-4, rtol=1e-4)


def keep_recurrent_state(hf: Any, seed: int = 0) -> Any:
    """Decays that keep a recurrent layer's state for several tokens (``Checkpoints``' widening x6 would make
    Mamba / Gated DeltaNet layers forget at once): every ``A_log`` in [-2, 0], every ``dt_bias`` (or Mamba's
    ``dt_proj.bias``) around -1."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for module in hf.modules():
            a_log = getattr(module, "A_log", None)
            if isinstance(a_log, torch.nn.Parameter):
                a_log.copy_(torch.empty(a_log.shape).uniform_(-2.0, 0.0, generator=g))
                bias = getattr(module, "dt_bias", None)
                if bias is None and getattr(module, "dt_proj", None) is not None:
                    bias = module.dt_proj.bias
                if bias is not None:
                    bias.copy_(torch.randn(bias.shape, generator=g) - 1.0)
    return hf


class RecurrentCheckpoints(Checkpoints):
    """:class:`Checkpoints` of hybrid / recurrent families: :func:`keep_recurrent_state` applied."""

    def model(self, family: str, seed: int = 0) -> Any:
        return keep_recurrent_state(super().model(family, seed), seed)


def check_hit_from_stored_state(ours: Any, hf: Any, vocab: int, state_part: Any = None) -> None:
    """A second sequence whose first three blocks are copies of another's (the third filled by a decode step: a
    storage hit) continues from their pages and gives transformers' logits, as it does from the first two (a
    snapshot the prefill took inside its chunk); with the recurrent layers' part of the third page zeroed
    (``state_part(page) -> tensor``, default: the whole page of every recurrent layer) it does not."""
    from dualpath.model import KVPool, SeqBatch

    seq = sum(random_turns(vocab, 4), [])
    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=32, block_tokens=4)
    first, second = pool.allocate(8), pool.allocate(8)
    ours(SeqBatch.build([seq[:11]], [0], [first], 4), pool.layers)
    ours.decode_step(torch.tensor([seq[11]]), torch.tensor([11]), torch.tensor([first], dtype=torch.int32),
                     pool.layers)
    for layer in pool.layers:
        layer[second[:3]] = layer[first[:3]]
    full = hf_logits(hf, seq)
    ref = full[12:]
    got = ours(SeqBatch.build([seq[12:]], [12], [second], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    third = pool.allocate(8)
    for layer in pool.layers:
        layer[third[:2]] = layer[first[:2]]
    got = ours(SeqBatch.build([seq[8:]], [8], [third], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, full[8:], atol=2e-4, rtol=1e-4)
    for layer, kind in enumerate(ours.spec.layer_types):
        if kind != "full_attention" or state_part is not None:
            page = pool.layers[layer][second[2]]
            (state_part(page) if state_part is not None else page).zero_()
    got = ours(SeqBatch.build([seq[12:]], [12], [second], 4), pool.layers, all_positions=True)
    assert float((got - ref).abs().max()) > 0.05


def assert_same_bf16_rounding(got: torch.Tensor, ref: torch.Tensor, max_fraction: float = 0.02) -> None:
    """``got`` and ``ref`` (bf16 results of the same module on the same input) round alike: at most ``max_fraction``
    of the elements differ (a different accumulation order may flip a rare rounding), none by more than one bf16 step
    at the scale of ``ref``. A rounding done elsewhere (a weight multiplied before or after the cast, a router in
    another precision) changes a quarter or more of them."""
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape and ref.abs().max() > 0.1
    differ = float((got != ref).float().mean())
    assert differ <= max_fraction, f"{differ:.1%} of the elements round differently"
    assert float((got - ref).abs().max()) <= 2.0 ** -7 * float(ref.abs().max())


def check_long_segments(ours: Any, hf: Any, vocab: int) -> None:
    """In 64-token blocks: a 45-token prefill (one segment of the scan, past what 4-token blocks ever run), a
    2-token chunk over it and a decode step: every logit row equals transformers' full forward."""
    from dualpath.model import KVPool, SeqBatch

    seq = sum(random_turns(vocab, 8, lens=(20, 15, 13)), [])
    pool = KVPool(paged_kv_spec(ours.spec, 64), num_blocks=2, block_tokens=64)
    table = pool.allocate(1)
    rows = [ours(SeqBatch.build([seq[:45]], [0], [table], 64), pool.layers, all_positions=True),
            ours(SeqBatch.build([seq[45:47]], [45], [table], 64), pool.layers, all_positions=True),
            ours.decode_step(torch.tensor([seq[47]]), torch.tensor([47]), torch.tensor([table], dtype=torch.int32),
                             pool.layers)]
    ref = hf_logits(hf, seq)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(torch.cat(rows), ref, atol=2e-4, rtol=1e-4)


def dense_on_shared(sparse: Any) -> Any:
    """A DSA model's ``_sparse_attention`` (``sparse``) whose shared layers (no indexer of their own) attend to every
    visible key instead of the selection they reuse: what the tests of GLM-5, Hy4 and GLM-5.3-Flash compare with to
    show that the reuse matters."""

    def attend(indexer: Any, x: Any, q_resid: Any, qq: Any, state: Any, kv_layer: Any, latent: Any,
               sinks: Any = None) -> Any:
        if indexer is None:
            state.dsa_masks = {i: torch.ones_like(m).tril(m.shape[1] - m.shape[0]) for i, m in state.dsa_masks.items()}
        return sparse(indexer, x, q_resid, qq, state, kv_layer, latent, sinks)

    return attend


class LanguageModelView:
    """An image-text model called as it is, its language model's layers as ``model.layers`` (what
    :func:`routing_margins` hooks)."""

    def __init__(self, hf: Any) -> None:
        self.hf, self.model = hf, hf.model.language_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf(*args, **kwargs)


def check_text_config_refused(directory: Any, key: str, value: Any, needle: str) -> None:
    """The image-text checkpoint in ``directory`` with its ``text_config[key]`` set to ``value`` is refused by
    :func:`dualpath.model.spec.load_spec` with a :class:`ModelError` matching ``needle``."""
    import json
    from pathlib import Path

    import pytest

    from dualpath.errors import ModelError
    from dualpath.model.spec import load_spec

    cfg = json.loads((Path(directory) / "config.json").read_text())
    with pytest.raises(ModelError, match=needle):
        load_spec({**cfg, "text_config": {**cfg["text_config"], key: value}})


class WidenedLogits:
    """transformers' model with its logits widened to ``width`` columns as ours are where the LM head is narrower
    than the embedding (Apertus 1.5's pruned head, Molmo2's image tokens): -inf past the head's rows."""

    def __init__(self, hf: Any, width: int) -> None:
        self.hf, self.config, self.width = hf, hf.config, width

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from types import SimpleNamespace

        out = self.hf(*args, **kwargs)
        logits = out.logits.float()
        logits = torch.nn.functional.pad(logits, (0, self.width - logits.shape[-1]), value=float("-inf"))
        return SimpleNamespace(logits=logits, cache=getattr(out, "cache", None))

    def eval(self) -> WidenedLogits:
        self.hf.eval()
        return self

    @staticmethod
    def loader(width: int, check: Any = None) -> Any:
        """An object whose ``from_pretrained(path, **kw)`` is transformers' auto causal-LM class reading ``path``,
        widened (what :func:`check_save_reads_back` loads); ``check(model)`` asserts what was read."""
        from types import SimpleNamespace

        def from_pretrained(path: str, **kwargs: Any) -> tuple[WidenedLogits, Any]:
            import transformers

            hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if check is not None:
                check(hf)
            return WidenedLogits(hf, width), info

        return SimpleNamespace(from_pretrained=from_pretrained)


def widen_language_model(hf: Any, moved: tuple[str, ...] = ("norm",), skip: tuple[str, ...] = (),
                         only: tuple[str, ...] = ()) -> Any:
    """transformers' image-text (or captioning) model with its language model's weights widened so that every one
    matters: the parameters whose names hold one of ``moved`` (its norms) or end in ``bias`` moved N(0, 0.2) about
    their init (seeded), every other one x3; the parameters under ``skip`` (or outside ``only``) left as they are
    (the vision towers, which a text prompt never runs)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if (skip and n.startswith(skip)) or (only and not n.startswith(only)):
                continue
            if any(m in n for m in moved) or n.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(3.0)
    return hf
