"""Every scalar config key, moved one at a time, read as transformers reads it: over every registry type that
``registry_logits_vs_hf.py`` compares.

For each such type, its shrunk config (that script's :func:`shrink`) and each key in it, in its text config, in
their RoPE parameters, in each ``per_layer_config`` override and in DBRX's ``attn_config`` / ``ffn_config`` moved (an integer doubled, a float x1.7 or an epsilon x1e6, a flag flipped, an activation
swapped, a per-layer list of kinds rotated: :func:`_moved`). transformers builds its model from the moved config
and takes the original model's weights where the shapes agree (fresh ones where they do not). Then:

* our spec of the moved config equals the original's (our reader ignores the key): transformers' language-model
  shapes and logits must not move either, else the key is reported ``ignored`` (a checkpoint that sets it would be
  misread, or fail to load without naming the key);
* our spec moved (our reader reads the key): transformers saves that model, our loader reads it, and our logits (two
  prefill chunks and a decode step over paged KV) must equal transformers' within 1e-3 of their range, else the key
  is reported ``misread``; where the move takes transformers' logits less than ten times as far as ours are from
  them, the comparison cannot tell the key read from ignored, and it is reported ``unverified`` (:func:`_unverified`).
  A move that our reader or transformers refuses is counted as refused.

Keys that only steer weight initialisation, training or the vision / audio side, and special tokens, are not moved
(context lengths are: 17 tokens are far below any of them, so a RoPE scaled by the context length is what they
check). Nothing downloads. Run:
``python benchmarks/config_keys_vs_hf.py [--types llama,zamba2] [--json OUT]``.

Found by it, and fixed: Zamba2's ``attention_head_dim`` and RecurrentGemma's ``head_dim`` (derived from the widths
whatever the config said), Gemma 3's outer ``tie_word_embeddings`` (a text-level key overrode it), an ``mlp_bias`` that
DeepSeek-V2's, MiniCPM3's and Cwm's transformers code would add (now refused by name), and HyperCLOVA X Vision's
untied head, which transformers writes under ``model.language_model.lm_head``; with activations, per-layer kind lists
and RoPE parameters moved too, DeepSeek-V4's compressed layers' own ``partial_rotary_factor`` and Qwen2-MoE's sliding
``layer_types`` without ``use_sliding_window`` (a window of 0 in transformers), both now refused by name; over the
types the shrink fits since, Llama 4's head tying (its outer ``tie_word_embeddings`` read, which transformers leaves
to the text config) and GLM-5.3-Flash's (its outer key ignored here). Doge's MoE
differs from transformers' multi-token forward by design (:data:`_KNOWN`).

Parameters a moved key adds (``mlp_bias``'s biases) are perturbed as the original model's were, so that a reader
ignoring the key moves the logits (it caught Arcee's ``mlp_bias``, dropped by a first version of its reading). A config we refuse that
transformers' class builds but cannot run (more expert groups picked than exist) counts as refused by transformers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry_logits_vs_hf import V, reference_logits, shrink  # noqa: E402

#: key name parts never moved: initialisation, training, bookkeeping, special tokens, the towers
_SKIP = ("init", "dropout", "pdrop", "use_cache", "token_id", "token_index", "output_", "return_dict", "chunk_size_feed",
         "is_encoder_decoder", "num_labels", "dtype", "pretraining_tp", "vision", "audio", "image", "video",
         "vocab_size", "mm_", "projector", "spatial", "temporal", "patch",
         "model_max_length", "aux_loss", "loss", "logits_to_keep", "mtp", "nextn", "cache", "label",
         "time_step_max", "time_step_floor", "time_step_scale", "rescale_prenorm_residual", "a_log_min",
         "a_log_max", "downsample", "scale_factor", "merger", "num_channels", "latent_query", "out_hidden_size",
         "alignment_intermediate")
#: moves whose transformers reference is not what ours must equal, each with the test that checks ours instead
_KNOWN = {("doge", "is_moe"): "transformers' multi-token forward mixes CDMoE router logits across tokens; ours equals "
                               "its generation, one token at a time (test_doge_hf.py)"}
#: parameter name parts of the towers (their shapes may follow a moved key without touching the language model)
_TOWERS = ("vision", "visual", "image", "audio", "projector", "multi_modal", "mm_", "patch", "vit", "merger",
           "connector", "resampler", "aligner", "tower", "qformer", "query_tokens")


#: activations swapped by a move (each to one every family here can run)
_ACT_SWAP = {"silu": "gelu_pytorch_tanh", "swish": "gelu_pytorch_tanh", "gelu": "silu", "gelu_pytorch_tanh": "silu",
             "gelu_new": "silu", "relu2": "silu", "relu": "silu", "gelu_fast": "silu"}
#: layer kinds swapped by a move in a per-layer list whose entries are all one kind
_KIND_SWAP = {"full_attention": "sliding_attention", "sliding_attention": "full_attention", "dense": "sparse",
              "sparse": "dense", "attention": "mamba", "mamba": "attention", "recurrent": "attention"}


def _moved(value: Any, key: str = "") -> Any:
    """The moved value: a flag flipped, an integer doubled, a float x1.7 (an epsilon x1e6), an activation swapped
    (``*act*`` keys), a per-layer list of kinds rotated by one (or its first entry swapped where all are one kind);
    None: not moved."""
    if isinstance(value, str):
        return _ACT_SWAP.get(value) if "act" in key else None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if len(set(value)) > 1:
            return value[1:] + value[:1]
        return [_KIND_SWAP[value[0]], *value[1:]] if value[0] in _KIND_SWAP else None
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value > 0 else value + 1
    if isinstance(value, float) and "eps" in key:  # (x1.7 moves no logit by 1e-3, nor does x1e4 on a final norm's:
        return value * 1e6 if value != 0 else 1.0  # CTRL's recorded but not applied read as equal; x1e6 does not)
    if isinstance(value, float):
        return value * 1.7 if value != 0 else 0.3
    return None


def _model(model_type: str, arch: str, cfg: dict[str, Any]) -> Any:
    import transformers
    from transformers import AutoConfig

    obj = type(AutoConfig.for_model(model_type)).from_dict(copy.deepcopy(cfg))
    torch.manual_seed(0)
    return getattr(transformers, arch)(obj).eval()


def run(model_type: str, arch: str, only: Collection[str] | None = None) -> dict[str, Any]:
    """The row of one type: every key moved (``only``: just these dotted names), with ``read`` listing the keys our
    reader read and whose logits then equal transformers'."""
    from transformers import AutoConfig

    from dualpath.model.spec import load_spec

    row: dict[str, Any] = {"model_type": model_type, "architecture": arch, "ignored": [], "misread": [],
                           "refused_by_us": [], "read": [], "unverified": []}
    counts = {"read": 0, "read_unverified": 0, "ignored": 0, "refused": 0, "refused_by_transformers": 0,
              "refused_by_us": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoConfig.for_model(model_type).to_dict()
        kw = shrink({k: v for k, v in base.items() if k not in ("transformers_version", "architectures")})
        try:
            ref_model = _model(model_type, arch, kw)
            with torch.no_grad():
                for n, p in ref_model.named_parameters():
                    p.add_(0.1 * torch.randn_like(p)) if ("norm" in n.lower() or n.endswith("bias")) else p.mul_(3.0)
            weights = ref_model.state_dict()
            seq = torch.randint(5, V, (17,), generator=torch.Generator().manual_seed(1)).tolist()
            with torch.no_grad():
                ref = reference_logits(ref_model, seq)
            spec0 = load_spec({**type(AutoConfig.for_model(model_type)).from_dict(copy.deepcopy(kw)).to_dict(),
                               "architectures": [arch]})
        except Exception as exc:
            return {**row, "status": "skipped", "detail": f"{type(exc).__name__}: {str(exc)[:160]}"}
        for path in _levels(kw):
            level = kw
            for p in path:
                level = level[p]
            for key, value in list(level.items()):
                new = _moved(value, key)
                if new is None or any(s in key for s in _SKIP):
                    continue
                variant = copy.deepcopy(kw)
                target = variant
                for p in path:
                    target = target[p]
                target[key] = new
                name = ".".join((*path, key))
                if only is not None and name not in only:
                    continue
                try:
                    full = type(AutoConfig.for_model(model_type)).from_dict(copy.deepcopy(variant)).to_dict()
                    model = _model(model_type, arch, variant)
                except Exception:
                    counts["refused"] += 1  # (refused by transformers: no checkpoint says it)
                    counts["refused_by_transformers"] += 1
                    continue
                try:
                    read = load_spec({**full, "architectures": [arch]}) != spec0
                except Exception as exc:  # (refused by us, by name: the key is not silently ignored)
                    counts["refused"] += 1
                    if not _runs(model, seq):  # (transformers builds it but cannot run it either)
                        counts["refused_by_transformers"] += 1
                        continue
                    counts["refused_by_us"] += 1
                    row["refused_by_us"].append({"key": name, "from": value, "to": new, "why": str(exc)[:160]})
                    continue
                state = model.state_dict()
                if read:
                    _take_weights(model, state, weights)
                    verdict = _read_key(model, seq, ref)
                    if verdict is None or verdict["status"] == "refused":
                        counts["refused"] += 1
                        counts["refused_by_us" if verdict else "refused_by_transformers"] += 1
                        if verdict:
                            row["refused_by_us"].append({"key": name, "from": value, "to": new,
                                                         "why": verdict["detail"]})
                    elif verdict["status"] == "ok" and _unverified(verdict):
                        counts["read_unverified"] += 1
                        row["unverified"].append({"key": name, "from": value, "to": new, **verdict})
                    elif verdict["status"] == "ok":
                        counts["read"] += 1
                        row["read"].append(name)
                    elif (model_type, name) in _KNOWN:
                        row.setdefault("known", []).append({"key": name, "why": _KNOWN[(model_type, name)], **verdict})
                    else:
                        row["misread"].append({"key": name, "from": value, "to": new, **verdict})
                    continue
                counts["ignored"] += 1
                lm_shapes = [n for n, t in state.items() if n in weights and t.shape != weights[n].shape
                             and not any(s in n.lower() for s in _TOWERS)]
                if lm_shapes:
                    row["ignored"].append({"key": name, "from": value, "to": new, "why": f"shapes: {lm_shapes[:3]}"})
                    continue
                _take_weights(model, state, weights)
                try:
                    with torch.no_grad():
                        got = reference_logits(model, seq)
                except Exception:
                    continue
                if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-4, rtol=1e-4):
                    diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
                    row["ignored"].append({"key": name, "from": value, "to": new, "why": f"logits moved {diff:.3g}"})
    status = "misread keys" if row["misread"] else "ignored keys" if row["ignored"] else "ok"
    return {**row, "status": status, "keys": counts}


def _runs(model: Any, seq: list[int]) -> bool:
    """Whether transformers' model of a moved config computes finite logits (some configs its classes build fail in
    the forward, e.g. more groups picked than there are)."""
    try:
        with torch.no_grad():
            return bool(torch.isfinite(reference_logits(model, seq)).all())
    except Exception:
        return False


def _take_weights(model: Any, state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """``model`` given the original model's ``weights`` wherever the shapes agree, its own ``state`` elsewhere, a
    parameter the moved key added (a bias, a norm) perturbed as the original's were: left at its initialisation
    (zeros, ones) a key that adds it would move no logit even where a reader ignores it. (Buffers are not: they are
    derived, as MiniMax's decay rates from the layer index.)"""
    gen = torch.Generator().manual_seed(2)
    params = {n for n, _ in model.named_parameters()}

    def perturbed(n: str, t: torch.Tensor) -> torch.Tensor:
        if n not in params or not t.is_floating_point():
            return t
        return t + 0.1 * torch.randn(t.shape, generator=gen).to(t.dtype)

    model.load_state_dict({n: (weights[n] if n in weights and weights[n].shape == t.shape
                               else t if n in weights else perturbed(n, t))
                           for n, t in state.items()})


#: sub-dicts of a language model's config whose keys are moved too (DBRX's attention and MoE, Kimi Linear's KDA)
_SUB_LEVELS = ("attn_config", "ffn_config", "linear_attn_config")


def _levels(kw: dict[str, Any]) -> list[tuple[str, ...]]:
    """The dicts whose keys are moved: the config, its text config, and in each their RoPE parameters (and a RoPE
    per layer type inside them), each layer's ``per_layer_config`` overrides and :data:`_SUB_LEVELS`."""
    out: list[tuple[str, ...]] = []
    for base in [()] + [(s,) for s in ("text_config",) if isinstance(kw.get(s), dict)]:
        out.append(base)
        level = kw if not base else kw[base[0]]
        for key, value in level.items():
            if not isinstance(value, dict):
                continue
            if "rope" in key or key == "per_layer_config":
                if "rope" in key:
                    out.append((*base, key))
                out += [(*base, key, k) for k, v in value.items() if isinstance(v, dict)]
            elif key in _SUB_LEVELS:
                out.append((*base, key))
    return out


def _unverified(verdict: dict[str, Any]) -> bool:
    """Whether an ``ok`` comparison cannot tell the key read from the key ignored: the move took transformers'
    logits less than ten times as far as ours are from them (but past float noise), so a reader that recorded the
    key and did not apply it could pass the 1e-3-of-range tolerance. A move that changes nothing, as a context
    length 17 tokens never reach does, is verified: ours must not move either."""
    moved, err = verdict["moved_by"], verdict["max_abs_logit_diff"]
    return 1e-5 * max(1.0, verdict["logit_scale"]) < moved < 10 * err


def _read_key(model: Any, seq: list[int], base: torch.Tensor) -> dict[str, Any] | None:
    """transformers' ``model`` saved, read by our loader, compared (None: transformers cannot run it on text;
    status ``refused``: our loader refuses it by name); ``moved_by``: how far the move took transformers' logits
    from ``base``, the unmoved model's (inf where their shapes differ)."""
    import tempfile

    from registry_logits_vs_hf import compare

    from dualpath.errors import ModelError
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    try:
        with torch.no_grad():
            ref = reference_logits(model, seq)
    except Exception:
        return None
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        try:
            ours = load_model(LlamaModelConfig(path=d, attention_backend="torch", time_model="off"),
                              with_tokenizer=False)[0]
        except ModelError as exc:
            if "does not match the model config" in str(exc):
                return {"status": "load failed", "detail": str(exc)[:200]}
            return {"status": "refused", "detail": str(exc)[:160]}
    moved_by = float((ref - base).abs().max()) if ref.shape == base.shape else float("inf")
    return {**compare(ours, ref, seq), "moved_by": moved_by}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", help="comma-separated model types (default: every 'ok' row of "
                    "benchmarks/results/registry_logits_vs_hf.json)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    rows_in = json.loads((Path(__file__).parent / "results" / "registry_logits_vs_hf.json").read_text())["rows"]
    todo = [(r["model_type"], r["architecture"]) for r in rows_in if r["status"] == "ok"]
    if args.types:
        want = set(args.types.split(","))
        todo = [t for t in todo if t[0] in want]
    rows = []
    for model_type, arch in todo:
        row = run(model_type, arch)
        rows.append(row)
        if row["status"] != "ok":
            print(f"{model_type:28s} {row['status']}: {row['misread'] or row['ignored'] or row.get('detail')}",
                  flush=True)
    counts: dict[str, int] = {}
    keys = {"read": 0, "read_unverified": 0, "ignored": 0, "refused": 0, "refused_by_transformers": 0,
            "refused_by_us": 0}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        for k in keys:
            keys[k] += r.get("keys", {}).get(k, 0)
    print(f"{len(rows)} types: {counts}; keys moved: {keys} (read: by us, our logits then equal transformers'; ignored: by our reader; refused: by either side, split by side)")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python benchmarks/config_keys_vs_hf.py --json OUT",
                                               "counts": counts, "keys": keys, "rows": rows},
                                              indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
