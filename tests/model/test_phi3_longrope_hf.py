"""Phi-3 LongRoPE (Phi-3.5-mini, Phi-3-mini-128k, Phi-4-mini) against transformers on the same random weights.

transformers turns every position of a forward with the short factors while the forward's longest sequence fits in
``original_max_position_embeddings`` and with the long ones past it. Our factor set is fixed per deployment
(:func:`dualpath.model.spec.rope_long_for`): by default the short one, with the context capped at
``original_max_position_embeddings`` (transformers' numbers at every length it allows); with ``max_context`` above it,
the long one at every position (transformers' numbers for every sequence longer than the original context). The test
model's original context is 64 tokens of 256, with factors far from 1 so that each set matters.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_random import Checkpoints, cluster_read_paths, hf_logits
from test_deepseek import paged_turns

from dualpath.engine.model_api import LlamaAdapter
from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB, ORIG = 97, 64
SHORT, LONG = [1.0, 1.3, 2.1, 3.7], [1.5, 4.0, 9.0, 20.0]
KW = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0,
      "bos_token_id": 1, "eos_token_id": 2, "partial_rotary_factor": 0.5, "rope_theta": 500.0,
      "original_max_position_embeddings": ORIG,
      "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}}
_CKPTS = Checkpoints({"phi3_longrope": ("Phi3Config", "Phi3ForCausalLM", KW)})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _CKPTS.get("phi3_longrope", tmp_path_factory)


def _load(d, max_context=None, backend="torch"):
    return load_model(LlamaModelConfig(path=str(d), attention_backend=backend, max_context=max_context,
                                       time_model="off"), with_tokenizer=False)[0]


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_spec_reads_transformers_longrope(ckpt):
    """transformers' saved config (``rope_parameters`` with both factor lists, the original context at the top level)
    reads as a longrope spec on its short factors, capped at the original context; ``max_context`` above it picks
    the long factors (another block-key namespace); both round-trip through ``to_hf_config``."""
    d, hf = ckpt
    short = load_spec(d)
    assert isinstance(short, ModelSpec) and short.rope_type == "longrope" and short.rope_long is False
    assert (short.context_limit, short.max_position, short.rotary_dim) == (ORIG, 256, 8)
    assert short.rope_scaling is not None and short.rope_scaling["short_factor"] == SHORT
    long = load_spec(d, max_context=200)
    assert isinstance(long, ModelSpec) and long.rope_long is True and long.context_limit == 200
    assert long.fingerprint() != short.fingerprint()
    assert load_spec(d, max_context=ORIG).rope_long is False  # exactly the original context: still short
    for spec in (short, long):
        assert ModelSpec.from_hf_config(spec.to_hf_config(), max_context=spec.context_cap) == spec
    # transformers' own tables: the short inverse frequencies and the cos/sin scale sqrt(1 + ln 4 / ln 64)
    ours = build_model(short, None, seed=0)
    torch.testing.assert_close(ours.inv_freq, hf.model.rotary_emb.original_inv_freq, rtol=1e-6, atol=0)
    assert ours._rope_scale == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert ours._rope_scale == pytest.approx((1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(64.0))).sqrt())


def test_short_factors_multi_turn_equal_transformers(ckpt):
    """Three turns over the paged KV inside the original context (transformers' short factors at every step):
    logits at every prefill and decode step and the greedy ids equal transformers' own cached run."""
    d, hf = ckpt
    turns = [_ids(11, 1), _ids(5, 2), _ids(7, 3)]
    ours, ref, ids, ref_ids = paged_turns(_load(d), hf, turns, 7, 4)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ids == ref_ids and len(ids) == 21


def test_long_factors_past_the_original_context(ckpt):
    """``max_context`` 256: a 70-token prompt (past the original 64), a chunk over its paged prefix and decode steps;
    every row equals transformers' full recompute of the sequence, which turns every position with the long
    factors. The short model refuses the same prompt, naming ``max_context``."""
    d, hf = ckpt
    seq = _ids(86, 4)
    model = _load(d, max_context=256)
    assert LlamaAdapter(model, 4).max_context == 256
    pool = KVPool(model.spec.kv_spec(), num_blocks=24, block_tokens=4)
    table = pool.allocate(24)[::-1]
    rows = [model(SeqBatch.build([seq[:70]], [0], [table], 4), pool.layers, all_positions=True),
            model(SeqBatch.build([seq[70:80]], [70], [table], 4), pool.layers, all_positions=True)]
    for p in range(80, len(seq)):
        rows.append(model.decode_step(torch.tensor([seq[p]]), torch.tensor([p]), torch.tensor([table]),
                                      pool.layers))
    ref = hf_logits(hf, seq)
    torch.testing.assert_close(torch.cat(rows), ref, atol=2e-4, rtol=1e-4)
    # the set matters: the short model's logits over the first 60 tokens differ from the long model's
    short = _load(d)
    assert LlamaAdapter(short, 4).max_context == ORIG
    p2 = KVPool(short.spec.kv_spec(), num_blocks=24, block_tokens=4)
    got_short = short(SeqBatch.build([seq[:60]], [0], [p2.allocate(15)], 4), p2.layers, all_positions=True)
    torch.testing.assert_close(got_short, hf_logits(hf, seq[:60]), atol=2e-4, rtol=1e-4)
    assert float((got_short - ref[:60]).abs().max()) > 0.1
    with pytest.raises(ModelError, match=r"position 69 is past the model's context of 64 tokens.*max_context"):
        short(SeqBatch.build([seq[:70]], [0], [pool.allocate(0) + table[:18]], 4), pool.layers)


def test_triton_backend_long_factors(ckpt):
    """The Triton kernels (interpreter on CPU) on the long factors: a 68-token prompt and two decode steps."""
    d, hf = ckpt
    seq = _ids(70, 5)
    model = _load(d, max_context=128, backend="triton")
    pool = KVPool(model.spec.kv_spec(), num_blocks=20, block_tokens=4)
    table = pool.allocate(20)
    rows = [model(SeqBatch.build([seq[:68]], [0], [table], 4), pool.layers)]
    for p in (68, 69):
        rows.append(model.decode_step(torch.tensor([seq[p]]), torch.tensor([p]), torch.tensor([table]),
                                      pool.layers))
    ref = hf_logits(hf, seq)
    torch.testing.assert_close(torch.cat(rows), ref[67:], atol=2e-4, rtol=1e-4)


def test_our_save_pretrained_is_read_by_transformers(tmp_path):
    """A seeded random Phi-3.5-style model saved by us: transformers reads our LongRoPE config (and the original
    context at the top level, where Phi3Config looks first) to the same logits."""
    spec = ModelSpec.from_hf_config(dict(KW, architectures=["Phi3ForCausalLM"]))
    model = build_model(spec, None, seed=3)
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["original_max_position_embeddings"] == ORIG and cfg["rope_scaling"]["rope_type"] == "longrope"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = _ids(40, 6)
    pool = KVPool(spec.kv_spec(), num_blocks=12, block_tokens=4)
    ours = model(SeqBatch.build([ids], [0], [pool.allocate(10)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=1e-5, rtol=1e-4)


def test_hub_configs_and_bad_longrope_configs():
    """Phi-3.5-mini-instruct's and Phi-4-mini's published RoPE keys at their real sizes (48 factors for 96 rotated
    dims; ``su`` read as longrope, as Phi3Config reads it), and configs we cannot run, each naming its key."""
    phi35 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu", "hidden_size": 3072,
             "intermediate_size": 8192, "max_position_embeddings": 131072, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
             "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 262144, "vocab_size": 32064,
             "rope_scaling": {"type": "longrope", "long_factor": [1.08] * 48, "short_factor": [1.0] * 48}}
    spec = load_spec(phi35)
    assert isinstance(spec, ModelSpec) and spec.rope_long is False and spec.context_limit == 4096
    assert load_spec(phi35, max_context=131072).context_limit == 131072
    assert load_spec(dict(phi35, rope_scaling=dict(phi35["rope_scaling"], type="su"))).rope_type == "longrope"
    phi4 = dict(phi35, num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
                vocab_size=200064, tie_word_embeddings=True)
    spec = load_spec(phi4)
    assert isinstance(spec, ModelSpec) and (spec.head_dim, spec.rotary_dim) == (128, 96)
    for rope, match in (({"type": "longrope", "long_factor": [1.0] * 47, "short_factor": [1.0] * 48},
                         r"rope_scaling.long_factor must be a list of 48"),
                        ({"type": "longrope", "short_factor": [1.0] * 48}, "missing 'long_factor'"),
                        ({"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [0.0] * 48},
                         "short_factor must be a list of 48 positive"),
                        ({"type": "dynamic", "factor": 2.0}, "rope_scaling type 'dynamic' unsupported for phi3")):
        with pytest.raises(ModelError, match=match):
            load_spec(dict(phi35, rope_scaling=rope))
    with pytest.raises(ModelError, match="original_max_position_embeddings must be a positive integer"):
        load_spec(dict(phi35, original_max_position_embeddings="4k"))


@pytest.mark.anyio
async def test_every_cluster_read_path_on_the_long_factors(ckpt):
    """``model.max_context`` reaches the engines: a session past the original context through the emulated cluster
    (PE read, DE read and forward, split, recompute) gives transformers' greedy tokens on every path."""
    d, hf = ckpt
    await cluster_read_paths(LlamaModelConfig(path=str(d), time_model="off", max_context=256), hf, _ids(66, 7),
                             [5, 17, 33, 2, 71, 64, 9], 64)


def test_generate_cli_needs_max_context_past_the_original_context(ckpt, tmp_path, capsys):
    """``dualpath generate``: a 60-token prompt with 12 new tokens passes the original context; without
    ``--max-context`` it is refused naming the flag; with it each greedy id is the argmax of transformers' full
    recompute of the 72-token sequence (long factors at every position; transformers' own ``generate`` would turn
    the 60-token prompt with the short factors, then switch: the per-forward choice this project does not make)."""
    from dualpath.cli import main

    d, hf = ckpt
    prompt = _ids(60, 8)
    args = ["generate", "--model", str(d), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12",
            "--ignore-eos", "--device", "cpu", "--block-tokens", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "72 tokens exceeds the model's context of 64 tokens" in err and "--max-context" in err
    out = tmp_path / "gen.json"
    assert main([*args, "--max-context", "128", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["runs"][0]["generated_ids"]
    assert len(got) == 12
    assert hf_logits(hf, prompt + got[:-1])[59:].argmax(-1).tolist() == got
