"""The per-family readers behind :meth:`dualpath.model.spec.ModelSpec.from_hf_config`: each turns one family's
``config.json`` keys (and its config class's defaults, where the key is absent) into spec fields, and refuses a bad
value naming its key. Sliding windows per layer, NoPE layers, RoPE variants per family, Granite's and gpt-oss's
scalings, Gemma's checks and the MoE blocks (the softmax routers' and GLM-4.5's grouped one) live here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from dualpath.errors import ModelError
from dualpath.model import layernorm_family as lnf
from dualpath.model import llama_variants as lv
from dualpath.model.archs import (
    _GRANITE_FIELDS,
    _HF_ARCH,
    ALL_MOE_ARCHS,
    GEMMA2_LIKE,
    GRANITE_ARCHS,
    GRANITE_SCALED,
    GRANITE_SWA,
)
from dualpath.model.spec_common import parse_rope

#: the model_types read without an ``architectures`` list (every architecture's own; Mistral's as Llama)
_MODEL_TYPES = ("mistral", "gemma3_text", "gemma4_unified_text", "kosmos_2_5_text_model", "kosmos-2.5", "molmo2", *(a for a in _HF_ARCH if a != "gemma3"))
_MAX_POSITION = {"granite_swa": 8192, "glm": 131072, "glm4": 131072, "phi3": 4096, "gemma": 8192, "gemma2": 8192, "vaultgemma": 8192, "gemma3": 131072, "gpt_oss": 131072, "smollm3": 32768,
                 "ministral": 131072, "glm4_moe": 131072, "seed_oss": 524288, "solar_open": 131072, "flex_olmo": 4096,
                 "afmoe": 16384, "mellum": 131072, "hy_v3": 131072, "flint": 262144, "kolibri1": 262144}
#: the config classes' RoPE base where it is not 10,000 (a config that names none)
_ROPE_THETA = {"smollm3": 2_000_000.0, "solar_open": 1_000_000.0, "hy_v3": 11_158_840.0}  # config classes' defaults
_KV_HEADS = {"gemma": 16, "gemma2": 4, "vaultgemma": 4, "gemma3": 4, "glm": 2, "glm4": 2, "solar_open": 8}
#: Gemma2Config's defaults (a key present as null turns a soft cap off)
_GEMMA2_DEFAULTS = {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


#: Gemma3TextConfig's: no soft caps
_GEMMA3_DEFAULTS = {"query_pre_attn_scalar": 256, "attn_logit_softcapping": None, "final_logit_softcapping": None}


def _gemma2_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if arch not in GEMMA2_LIKE:
        return {}
    defaults = _GEMMA3_DEFAULTS if arch == "gemma3" else _GEMMA2_DEFAULTS
    return {key: cfg.get(key, default) for key, default in defaults.items()}


#: GptOssConfig's RoPE when a config names none: YaRN x32 over 4,096 positions, base 150,000
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def _gpt_oss_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """A gpt-oss config with GptOssConfig's defaults filled in where it leaves them out: the RoPE (YaRN, base
    150,000), the window (128) and the layer types (even layers slide, odd ones attend fully); its ``hidden_act``
    is not read (the experts' clamped SwiGLU is fixed)."""
    out = dict(cfg)
    params = out.get("rope_parameters")
    if not isinstance(params, dict) and out.get("rope_scaling") is None:
        out["rope_parameters"] = {**_GPT_OSS_ROPE, "rope_theta": out.get("rope_theta", 150000.0)}
    elif isinstance(params, dict) and "rope_theta" not in params and out.get("rope_theta") is None:
        out["rope_parameters"] = {**params, "rope_theta": 150000.0}
    out.setdefault("rope_theta", 150000.0)
    out.setdefault("sliding_window", 128)
    if out.get("layer_types") is None and out.get("sliding_window") is not None:
        n = out.get("num_hidden_layers")
        if isinstance(n, int) and not isinstance(n, bool):
            out["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    return out


def _granite_fields(arch: str, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    if arch == "afmoe":  # Trinity's muP input scale, the only one of these it has
        mup = cfg.get("mup_enabled", False)
        if not isinstance(mup, bool) and mup is not None:
            raise ModelError(f"{where}: mup_enabled must be true or false, got {mup!r}")
        return {"embedding_multiplier": float(cfg["hidden_size"]) ** 0.5} if mup else {}
    if arch not in GRANITE_SCALED:
        return {}
    out: dict[str, Any] = {}
    if arch == "hyperclovax":
        post = cfg.get("use_post_norm", True)
        if not isinstance(post, bool):
            raise ModelError(f"{where}: use_post_norm must be true or false, got {post!r}")
        out["peri_norms"] = post
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
        cfg = {"attention_multiplier": float(head_dim) ** -0.5, **{k: v for k, v in cfg.items() if v is not None}}
    for key in _GRANITE_FIELDS:
        value = cfg.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ModelError(f"{where}: {key} must be a positive number, got {value!r}")
        out[key] = float(value)
    return out


def _smollm3_has_rope(cfg: dict[str, Any], where: str) -> list[int]:
    """SmolLM3's ``no_rope_layers`` (1: the layer uses RoPE, 0: it does not), or SmolLM3Config's default: every
    ``no_rope_layer_interval``-th layer (4th) without."""
    n = cfg.get("num_hidden_layers")
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = cfg.get("no_rope_layer_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            raise ModelError(f"{where}: no_rope_layer_interval must be a positive integer, got {interval!r}")
        flags = [int((i + 1) % interval != 0) for i in range(int(n or 0))]
    if isinstance(flags, list) and isinstance(n, int) and len(flags) > n:
        flags = flags[:n]  # (transformers reads a layer's own entry: a longer list's tail is never read)
    if (not isinstance(flags, list) or len(flags) != n
            or any(isinstance(f, bool) or f not in (0, 1) for f in flags)):
        raise ModelError(f"{where}: no_rope_layers must list 1 (RoPE) or 0 (none) for each of the {n} layers, got "
                         f"{flags!r}")
    return [int(f) for f in flags]


def _default_layer_types(arch: str, cfg: dict[str, Any], where: str) -> list[str]:
    """Flint's and Kolibri 1's ``layer_types``, or their config classes' patterns: Flint's first two, every fourth
    from layer 1 and its last layer full; Kolibri 1's every fifth."""
    n = int(cfg.get("num_hidden_layers") or 0)
    types = cfg.get("layer_types")
    if types is None:
        if arch == "flint":
            return ["full_attention" if i < 2 or i % 4 == 1 or i == n - 1 else "sliding_attention" for i in range(n)]
        return ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in ("full_attention", "sliding_attention")
                                                             for t in types):
        raise ModelError(f"{where}: layer_types must list 'full_attention' / 'sliding_attention' for each of the {n} "
                         f"layers, got {types!r}")
    return types


def _nope_layers(arch: str, cfg: dict[str, Any], where: str) -> tuple[int, ...]:
    if arch in ("cohere2", "cohere2_moe", "cohere_compass_text", "llama4_text"):  # (read by layernorm_family /
        # llama4: Cohere 2 rotates its sliding layers, Cohere Compass the layer types its rope_parameters name)
        return tuple(cfg["_nope_layers"])
    if arch == "afmoe":  # Trinity rotates its sliding layers only (whatever its window)
        return tuple(i for i, t in enumerate(_afmoe_layer_types(cfg, where)) if t == "full_attention")
    if arch in ("exaone4", "exaone_moe"):  # with a window, EXAONE 4's full-attention layers have no RoPE
        if cfg.get("sliding_window", 4096) is None:
            return ()
        return tuple(i for i, t in enumerate(_exaone4_layer_types(cfg, where)) if t == "full_attention")
    if arch in ("flint", "kolibri1"):  # RoPE on the sliding layers only (both need a window: _layer_windows)
        return tuple(i for i, t in enumerate(_default_layer_types(arch, cfg, where)) if t == "full_attention")
    if arch in GRANITE_SWA:  # a RoPE base of 0 in layer_rope_theta: no RoPE there
        return tuple(i for i, theta in enumerate(_granite_swa_thetas(cfg, where)) if theta == 0)
    if arch != "smollm3":
        return ()
    return tuple(i for i, f in enumerate(_smollm3_has_rope(cfg, where)) if not f)


def _granite_swa_thetas(cfg: dict[str, Any], where: str) -> list[float]:
    """GraniteSWA's ``layer_rope_theta``: one RoPE base per layer, 0 for none (default: the global base everywhere)."""
    n = int(cfg["num_hidden_layers"])
    thetas = cfg.get("layer_rope_theta")
    if thetas is None:
        return [parse_rope(cfg, where)[0]] * n
    if isinstance(thetas, list) and len(thetas) > n:
        thetas = thetas[:n]  # (transformers reads a layer's own entry: a longer list's tail is never read)
    if (not isinstance(thetas, list) or len(thetas) != n
            or any(isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0 for t in thetas)):
        raise ModelError(f"{where}: layer_rope_theta must list a RoPE base >= 0 (0: none) for each of the {n} layers, "
                         f"got {thetas!r}")
    return [float(t) for t in thetas]


def _granite_swa_rope(cfg: dict[str, Any], where: str, full_layers: tuple[int, ...], window: int | None
                      ) -> tuple[float, dict[str, Any] | None, float | None]:
    """``(rope_theta, rope_scaling, local base)`` of GraniteSWA: the RoPE bases of ``layer_rope_theta``, read as one
    base for the full layers and one for the sliding layers (the local one, when they differ). Other layouts, and a
    second base under a scaled RoPE (transformers scales each base; our sliding-layer RoPE is plain), are refused."""
    _, rope_scaling = parse_rope(cfg, where)
    thetas = _granite_swa_thetas(cfg, where)
    slides = [window is not None and i not in full_layers for i in range(len(thetas))]
    full = {t for t, s in zip(thetas, slides, strict=True) if t and not s}
    sliding = {t for t, s in zip(thetas, slides, strict=True) if t and s}
    if len(full) > 1 or len(sliding) > 1:
        raise ModelError(f"{where}: layer_rope_theta {thetas}: one RoPE base for the full layers and one for the "
                         "sliding layers are supported (0: no RoPE), not several per kind")
    base = next(iter(full or sliding), 10000.0)
    local = next(iter(sliding), base)
    if local == base:
        return base, rope_scaling, None
    if rope_scaling is not None:
        raise ModelError(f"{where}: layer_rope_theta gives the sliding layers their own base under a "
                         f"{rope_scaling.get('rope_type')!r} RoPE; unsupported")
    return base, None, local


def _afmoe_layer_types(cfg: dict[str, Any], where: str) -> list[str]:
    """Trinity's ``layer_types``, or AfmoeConfig's: every ``global_attn_every_n_layers``-th layer (4th) full."""
    n = int(cfg.get("num_hidden_layers") or 0)
    if cfg.get("layer_types") is not None:
        return list(cfg["layer_types"])  # (checked by _layer_windows)
    every = cfg.get("global_attn_every_n_layers", 4)
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise ModelError(f"{where}: global_attn_every_n_layers must be a positive integer, got {every!r}")
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]


def _exaone4_layer_types(cfg: dict[str, Any], where: str) -> list[str]:
    """EXAONE 4's ``layer_types``, or Exaone4Config's from ``sliding_window_pattern``: an integer ``p`` makes every
    ``p``-th layer full (default 4), a string such as ``"LLLG"`` repeats from layer 0 (``L`` sliding, ``G`` full)."""
    types = cfg.get("layer_types")
    n = int(cfg.get("num_hidden_layers") or 0)
    if types is not None:
        if (not isinstance(types, list) or len(types) != n
                or any(t not in ("sliding_attention", "full_attention") for t in types)):
            raise ModelError(f"{where}: layer_types must list 'sliding_attention' / 'full_attention' for each of the "
                             f"{n} layers, got {types!r}")
        return list(types)
    pattern = cfg.get("sliding_window_pattern", 4)
    if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:
        return ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention" for i in range(n)]
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
        raise ModelError(f"{where}: sliding_window_pattern must be a positive integer or a string of L and G, got "
                         f"{pattern!r}")
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _olmo3_rope(cfg: dict[str, Any], where: str,
                local_theta: float = 500000.0) -> tuple[float, dict[str, Any] | None, float]:
    """OLMo 3's two RoPEs as Olmo3Config (transformers 5) reads them: ``rope_parameters`` per layer type, or the
    legacy ``rope_theta`` and ``rope_scaling`` for the full layers; the sliding layers' base is ``local_theta``
    (OLMo 3: 500,000; Mellum: 10,000) unless ``rope_parameters.sliding_attention`` names one, and their RoPE is
    plain. The full layers' base defaults to 500,000 (both)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 500000.0)}
        local = {}
    if not isinstance(full, dict) or not isinstance(local, dict):
        raise ModelError(f"{where}: rope_parameters must map each layer type to an object")
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ModelError(f"{where}: rope_parameters.sliding_attention: only 'default' RoPE is supported for the "
                         f"sliding layers, got {local!r}")
    full.setdefault("rope_theta", 500000.0)
    theta, scaling = parse_rope({**cfg, "rope_parameters": full, "rope_scaling": None},
                                f"{where}: rope_parameters.full_attention")
    local_theta = local.get("rope_theta", local_theta)
    if isinstance(local_theta, bool) or not isinstance(local_theta, (int, float)) or not local_theta > 0:
        raise ModelError(f"{where}: the sliding layers' rope_theta must be a positive number, got {local_theta!r}")
    return theta, scaling, float(local_theta)


def _gpt_oss_fields(arch: str, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    if arch != "gpt_oss":
        return {}
    out: dict[str, Any] = {}
    for key, default in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702)):
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ModelError(f"{where}: {key} must be a positive number, got {value!r}")
        out[key] = float(value)
    return out


def _gemma3_rope(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None, float]:
    """Gemma 3's two RoPEs: ``(full layers' theta, their scaling, sliding layers' theta)``, from
    ``rope_parameters`` per layer type (transformers 5) or ``rope_theta`` / ``rope_scaling`` /
    ``rope_local_base_freq``, with Gemma3TextConfig's defaults (1e6, none, 1e4)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
    else:
        full = {"rope_theta": cfg.get("rope_theta", 1e6), **(cfg.get("rope_scaling") or {})}
        local = {"rope_theta": cfg.get("rope_local_base_freq", 1e4)}
    if not isinstance(full, dict) or not isinstance(local, dict):
        raise ModelError(f"{where}: rope_parameters must map each layer type to an object")
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ModelError(f"{where}: rope_parameters.sliding_attention: only 'default' RoPE is supported for gemma3's "
                         f"sliding layers, got {local!r}")
    theta, scaling = parse_rope({**cfg, "rope_parameters": {"rope_theta": 1e6, **full}, "rope_scaling": None},
                                f"{where}: rope_parameters.full_attention")
    local_theta = local.get("rope_theta", 1e4)
    if isinstance(local_theta, bool) or not isinstance(local_theta, (int, float)) or not local_theta > 0:
        raise ModelError(f"{where}: the sliding layers' rope_theta must be a positive number, got {local_theta!r}")
    return theta, scaling, float(local_theta)


def _check_gemma2(cfg: dict[str, Any], where: str) -> str | None:
    """Gemma 2's activation is ``hidden_activation`` (transformers 5 ignores ``hidden_act`` for it): the spec's
    ``activation`` where it is not GeGLU's tanh GELU, else None."""
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in lnf.ACTIVATIONS:
        raise ModelError(f"{where}: hidden_activation {act!r} unsupported; expected one of {sorted(lnf.ACTIVATIONS)}")
    if cfg.get("use_bidirectional_attention"):
        raise ModelError(f"{where}: use_bidirectional_attention=true is unsupported (a decoder attends causally)")
    return None if lnf.ACTIVATIONS[act] == "gelu_tanh" else lnf.ACTIVATIONS[act]


def _window_size(cfg: dict[str, Any], where: str) -> int:
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ModelError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    return window


def _layer_windows(arch: str, cfg: dict[str, Any], archs: list[str], model_type: Any,
                   where: str) -> tuple[int | None, tuple[int, ...]]:
    """``(window, full_attention_layers)`` as transformers reads the family's config (module docstring)."""
    n_layers = cfg.get("num_hidden_layers")
    if arch in ("gemma", "glm", "glm4", "arcee", "glm4_moe", "solar_open", "minimax_m2", "seed_oss", "hy_v3",
                "aria_text", "diffllama"):  # causal
        return None, ()
    if arch in lv.VARIANT_ARCHS and arch not in lv.WINDOWED:  # (their config classes have no window either)
        return None, ()
    if arch in ("cohere2", "cohere2_moe", "cohere_compass_text", "gpt_neo"):  # (read by layernorm_family)
        return cast(tuple[int | None, tuple[int, ...]], cfg["_windows"])
    if arch in lnf.LN_ARCHS:  # StarCoder 2 slides every layer or none; the others never
        if arch != "starcoder2" or cfg.get("sliding_window") is None:
            return None, ()
        return _window_size(cfg, where), ()
    if arch == "mellum":  # MellumConfig: layer_types (all full by default) over a 1,024-token window
        cfg = {"sliding_window": 1024, **cfg}
        if cfg.get("layer_types") is None:
            return None, ()
        if cfg["sliding_window"] is None and "sliding_attention" in cfg["layer_types"]:
            raise ModelError(f"{where}: sliding_window is null while layer_types has sliding layers (transformers "
                             "would turn them with the sliding RoPE over every key; unsupported)")
    if arch == "afmoe":  # AfmoeConfig: sliding layers by _afmoe_layer_types over 1,024 tokens (null: none)
        cfg = {"sliding_window": 1024, **cfg}
        if cfg["sliding_window"] is None:
            return None, ()
        cfg = {**cfg, "layer_types": _afmoe_layer_types(cfg, where)}
    if arch in ("flint", "kolibri1"):  # a 513-token window over their sliding layers (layer_types or the pattern)
        cfg = {"sliding_window": 513, **cfg}
        kinds = _default_layer_types(arch, cfg, where)
        if cfg["sliding_window"] is None:  # (FlintConfig refuses it; transformers' Kolibri 1 cannot build its masks)
            raise ModelError(f"{where}: sliding_window is null; {arch} needs a window")
        cfg = {**cfg, "layer_types": kinds}
    if arch == "dots1":  # Dots1Config: layers from max_window_layers (62) on slide over 4,096 tokens (null: none)
        cfg = {"sliding_window": 4096, "max_window_layers": 62, **cfg}
        if cfg["sliding_window"] is None:
            return None, ()
    if arch in ("llama", "mixtral", "phi3", "qwen3_moe", "olmoe", "ministral3", "phimoe"):  # every layer or none
        mistral = "MistralForCausalLM" in archs or (not archs and model_type == "mistral")
        if arch == "llama" and not mistral:
            return None, ()  # transformers' Llama ignores a sliding_window key
        if arch == "qwen3_moe" and not cfg.get("use_sliding_window"):
            return None, ()
        if cfg.get("sliding_window") is None:
            return None, ()
        return _window_size(cfg, where), ()
    if arch in ("qwen2", "qwen3", "qwen2_moe") and not cfg.get("use_sliding_window"):
        if arch == "qwen2_moe" and "sliding_attention" in (cfg.get("layer_types") or ()):
            raise ModelError(f"{where}: layer_types names sliding layers while use_sliding_window is false "
                             "(transformers' Qwen2-MoE then slides them over a window of 0 tokens)")
        return None, ()
    if arch == "gpt_oss" and cfg.get("sliding_window") is None:  # its sliding layers then attend fully
        return None, ()
    if arch in GRANITE_SWA:  # GraniteSWAConfig: every 4th layer (i % 4 == 0) full, the rest slide over 128 tokens
        cfg = {"sliding_window": 128, **cfg}
        if cfg.get("layer_types") is None:
            cfg = {**cfg, "layer_types": ["full_attention" if i % 4 == 0 else "sliding_attention"
                                          for i in range(int(n_layers or 0))]}
        if cfg["sliding_window"] is None and "sliding_attention" in cfg["layer_types"]:
            raise ModelError(f"{where}: sliding_window is null while layer_types has sliding layers (unsupported)")
    elif arch in ("olmo2", "flex_olmo", *GRANITE_SCALED):  # no window in these families
        return None, ()
    if arch == "smollm3":  # sliding only with use_sliding_window, by default on the layers without RoPE
        if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
            return None, ()
        if cfg.get("layer_types") is None:
            cfg = {**cfg, "layer_types": ["full_attention" if f else "sliding_attention"
                                          for f in _smollm3_has_rope(cfg, where)]}
    if arch in ("exaone4", "exaone_moe"):  # a 4,096-token window, every 4th layer full (sliding_window_pattern)
        cfg = {"sliding_window": 4096, **cfg}
        if cfg["sliding_window"] is None:
            return None, ()
        cfg = {**cfg, "layer_types": _exaone4_layer_types(cfg, where)}
    if arch == "ministral":  # MinistralConfig: a 4,096-token window, every layer sliding unless layer_types says
        cfg = {"sliding_window": 4096, **cfg}
        if cfg["sliding_window"] is None:
            return None, ()
        if cfg.get("layer_types") is None:
            cfg = {**cfg, "layer_types": ["sliding_attention"] * int(n_layers or 0)}
    if arch == "olmo3" and cfg.get("layer_types") is None:  # Olmo3Config: every 4th layer full
        cfg = {**cfg, "layer_types": ["sliding_attention" if (i + 1) % 4 else "full_attention"
                                      for i in range(int(n_layers or 0))]}
    if arch == "olmo3" and "sliding_window" not in cfg:
        cfg = {**cfg, "sliding_window": 4096}
    types = cfg.get("layer_types")
    if types is None:
        n = int(n_layers or 0)
        if arch in GEMMA2_LIKE:
            pattern = cfg.get("sliding_window_pattern", 6) if arch == "gemma3" else 2
            if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
                raise ModelError(f"{where}: sliding_window_pattern must be a positive integer, got {pattern!r}")
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        else:
            mwl = cfg.get("max_window_layers", 28)
            if not isinstance(mwl, int) or isinstance(mwl, bool):
                raise ModelError(f"{where}: max_window_layers must be an integer, got {mwl!r}")
            slides = (lambda i: (i + 1) % 2 == 1 and i < mwl) if arch == "qwen2_moe" else (lambda i: i >= mwl)
            types = ["sliding_attention" if slides(i) else "full_attention" for i in range(n)]
    if (not isinstance(types, list) or len(types) != n_layers
            or any(t not in ("sliding_attention", "full_attention") for t in types)):
        raise ModelError(f"{where}: layer_types must list 'sliding_attention' / 'full_attention' for each of the "
                         f"{n_layers} layers, got {types!r}")
    if "sliding_attention" not in types:
        return None, ()
    if arch in GEMMA2_LIKE and "sliding_window" not in cfg:
        cfg = {**cfg, "sliding_window": 4096}  # Gemma2Config's and Gemma3TextConfig's default
    return _window_size(cfg, where), tuple(i for i, t in enumerate(types) if t == "full_attention")


def _check_gemma(cfg: dict[str, Any], where: str) -> str | None:
    """Gemma's activation as transformers 5 picks it: ``hidden_act`` (default ``gelu_pytorch_tanh``; the legacy
    ``gelu`` of the original releases means the tanh approximation), the spec's ``activation`` where it is another
    (else None). transformers 4 read ``hidden_activation`` instead: a config where the two disagree is refused
    rather than guessed."""
    act = cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act == "gelu":
        act = "gelu_pytorch_tanh"
    if act not in lnf.ACTIVATIONS:
        raise ModelError(f"{where}: hidden_act {cfg.get('hidden_act')!r} unsupported for gemma; expected one of "
                         f"{sorted(lnf.ACTIVATIONS)}")
    other = cfg.get("hidden_activation")
    if other is not None and other != act:
        raise ModelError(f"{where}: hidden_activation {other!r} disagrees with hidden_act {cfg.get('hidden_act')!r} "
                         "(transformers 5 runs hidden_act, 4.x ran hidden_activation)")
    if cfg.get("use_bidirectional_attention"):
        raise ModelError(f"{where}: use_bidirectional_attention=true is unsupported (a decoder attends causally)")
    return None if lnf.ACTIVATIONS[act] == "gelu_tanh" else lnf.ACTIVATIONS[act]


def _phi3_rope(cfg: dict[str, Any], where: str,
               rope_scaling: dict[str, Any] | None) -> tuple[float, dict[str, Any] | None]:
    """Phi-3's ``partial_rotary_factor`` (where transformers' Phi3Config finds it: in the RoPE parameters, else at
    the top level) and its RoPE: ``default``, or ``longrope`` (Phi3Config reads ``su`` and ``yarn`` as longrope),
    with ``original_max_position_embeddings`` taken from the top level first, then the RoPE dict, then 4,096, as
    Phi3Config does."""
    partial = _partial_rotary(cfg, where, 1.0)
    if rope_scaling is None:
        return partial, None
    key = "rope_scaling" if isinstance(cfg.get("rope_scaling"), dict) else "rope_parameters"
    kind = rope_scaling.get("rope_type")
    if kind not in ("longrope", "su", "yarn"):
        raise ModelError(f"{where}: {key} type {kind!r} unsupported for phi3 (expected 'default' or 'longrope')")
    out = {k: v for k, v in rope_scaling.items() if k not in ("partial_rotary_factor", "rope_theta")}
    out["rope_type"] = "longrope"
    orig = cfg.get("original_max_position_embeddings", rope_scaling.get("original_max_position_embeddings", 4096))
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
        raise ModelError(f"{where}: original_max_position_embeddings must be a positive integer, got {orig!r}")
    out["original_max_position_embeddings"] = orig
    for name in ("short_factor", "long_factor"):
        if name not in out:
            raise ModelError(f"{where}: {key} of type longrope is missing {name!r}")
    return partial, out



def _minimax_rotary(cfg: dict[str, Any], where: str, head_dim: int) -> float:
    """MiniMax-M2's ``rotary_dim`` (the leading dims of each head RoPE turns) as a fraction of ``head_dim``, as
    MiniMaxM2Config converts it; 1.0 without one."""
    rot = cfg.get("rotary_dim")
    if rot is None:
        return 1.0
    if isinstance(rot, bool) or not isinstance(rot, int) or not 0 < rot <= head_dim:
        raise ModelError(f"{where}: rotary_dim must be an integer in [1, head_dim={head_dim}], got {rot!r}")
    return rot / head_dim


def _partial_rotary(cfg: dict[str, Any], where: str, default: float) -> float:
    """``partial_rotary_factor`` where transformers finds it: in the RoPE parameters (``rope_scaling`` when set,
    else ``rope_parameters``), else at the top level, else ``default`` (the config class's)."""
    partial: Any = cfg.get("partial_rotary_factor")
    if partial is None:
        partial = default
    for key in ("rope_scaling", "rope_parameters"):
        params = cfg.get(key)
        if isinstance(params, dict) and params:
            partial = params.get("partial_rotary_factor", partial)
            break
    if isinstance(partial, bool) or not isinstance(partial, (int, float)):
        raise ModelError(f"{where}: partial_rotary_factor must be a number, got {partial!r}")
    return float(partial)


@dataclass(frozen=True)
class _GroupMoE:
    """A family's keys and config-class defaults for GLM-4.5's MoE block (DeepSeek-V3's grouped sigmoid router
    with a correction bias, shared experts, leading dense layers); a default of None: the key is required."""

    experts: str
    n_experts: int | None
    top_k: int | None
    inter: int
    shared: str
    n_shared: int | None
    norm_topk: bool
    dense: str | None  # the leading dense layers' key (None: every layer has experts)
    n_dense: int
    factor: str = "routed_scaling_factor"
    scale: float = 1.0
    qk_norm: bool | None = None  # None: the config's use_qk_norm (default off)
    fixed: bool = False  # the router ignores the config's norm_topk_prob and groups (always renormalized, one group)


_GROUP_MOE = {
    "glm4_moe": _GroupMoE("n_routed_experts", 128, 8, 1408, "n_shared_experts", 1, True, "first_k_dense_replace", 1),
    "dots1": _GroupMoE("n_routed_experts", None, None, 1408, "n_shared_experts", None, False, "first_k_dense_replace",
                       0, qk_norm=True),  # (Qwen3's attention: q/k norms always)
    "solar_open": _GroupMoE("n_routed_experts", 128, 8, 1280, "n_shared_experts", 1, True, None, 0, qk_norm=False),
    "afmoe": _GroupMoE("num_experts", 64, 6, 1408, "num_shared_experts", 2, True, "num_dense_layers", 1,
                       factor="route_scale", qk_norm=True, fixed=True),
    "exaone_moe": _GroupMoE("num_experts", 64, 8, 1024, "num_shared_experts", 1, True, "first_k_dense_replace", 1,
                            scale=2.5, qk_norm=True),
    # Hy3 (HYV3Config): one group, always renormalized; dense layers by mlp_layer_types (default: layer 0)
    "hy_v3": _GroupMoE("num_experts", 192, 8, 1536, "num_shared_experts", 1, True, None, 1,
                       factor="router_scaling_factor", scale=2.826, qk_norm=True, fixed=True),
}


def _group_moe_fields(arch: str, cfg: dict[str, Any], where: str, n_layers: int,
                      as_int: Callable[[str, Any], int]) -> dict[str, Any]:
    """The MoE fields of a family running GLM-4.5's MoE block (:data:`_GROUP_MOE`): glm4_moe, dots1, solar_open,
    afmoe (Trinity: one group), exaone_moe (K-EXAONE) and hy_v3 (Hy3: one group): dense layers by
    ``mlp_layer_types`` when given."""
    g = _GROUP_MOE[arch]
    if cfg.get(g.experts) is None and cfg.get("num_local_experts") is not None:  # (their attribute_map's alias)
        cfg = {**cfg, g.experts: cfg["num_local_experts"]}
    defaults = {g.experts: g.n_experts, "num_experts_per_tok": g.top_k, g.shared: g.n_shared}
    missing = [k for k, v in defaults.items() if v is None and cfg.get(k) is None]
    if missing:
        raise ModelError(f"{where}: {arch} needs {', '.join(missing)} (its config class has no default)")
    if arch == "glm4_moe" and (cfg.get("topk_method", "noaux_tc") != "noaux_tc"
                               or cfg.get("scoring_func", "sigmoid") != "sigmoid"):
        raise ModelError(f"{where}: glm4_moe routes by sigmoid scores with a correction bias (noaux_tc)")
    factor = cfg.get(g.factor, g.scale)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ModelError(f"{where}: {g.factor} must be a positive number, got {factor!r}")
    kinds = cfg.get("mlp_layer_types") if arch in ("exaone_moe", "hy_v3") else None
    if kinds is not None:  # (transformers follows it over first_k_dense_replace, in any order)
        if not isinstance(kinds, list) or len(kinds) != n_layers or any(k not in ("dense", "sparse") for k in kinds):
            raise ModelError(f"{where}: mlp_layer_types must name 'dense' or 'sparse' for each of the {n_layers} "
                             f"layers, got {kinds!r}")
        dense_layers = tuple(i for i, kind in enumerate(kinds) if kind == "dense")
    else:
        dense = as_int(g.dense, cfg.get(g.dense, g.n_dense)) if g.dense else g.n_dense
        dense_layers = tuple(range(min(dense, n_layers)))
    inter = as_int("moe_intermediate_size", cfg.get("moe_intermediate_size", g.inter))
    return {"n_experts": as_int(g.experts, cfg.get(g.experts, g.n_experts)),
            "n_experts_per_tok": as_int("num_experts_per_tok", cfg.get("num_experts_per_tok", g.top_k)),
            "moe_intermediate_size": inter,
            "shared_expert_intermediate_size": inter * as_int(g.shared, cfg.get(g.shared, g.n_shared)),
            "norm_topk_prob": g.norm_topk if g.fixed else bool(cfg.get("norm_topk_prob", g.norm_topk)),
            "mlp_only_layers": dense_layers,
            "n_group": 1 if g.fixed else as_int("n_group", cfg.get("n_group", 1)),
            "topk_group": 1 if g.fixed else as_int("topk_group", cfg.get("topk_group", 1)),
            "routed_scaling_factor": float(factor),
            "use_qk_norm": bool(cfg.get("use_qk_norm", False)) if g.qk_norm is None else g.qk_norm}


def _moe_fields(arch: str, cfg: dict[str, Any], where: str, need: Any) -> dict[str, Any]:
    """The MoE fields of a mixtral / qwen2_moe / qwen3_moe / gpt_oss config (an empty dict for the dense
    architectures)."""
    if arch not in ALL_MOE_ARCHS or arch in lv.VARIANT_ARCHS or arch in lnf.LN_ARCHS:  # (read by
        # llama_variants.normalize_config, layernorm_family.normalize_config)
        return {}

    def as_int(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"{where}: {key} must be an integer, got {value!r}")
        return value

    if arch in _GROUP_MOE:
        return _group_moe_fields(arch, cfg, where, int(need("num_hidden_layers")), as_int)
    if arch in ("flint", "kolibri1"):  # (SIGMOID_ROUTER_ARCHS) an ungated shared expert; Flint's dense layers
        flint = arch == "flint"
        key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
        mlp_only = cfg.get("mlp_only_layers", [0, 1]) if flint else []
        if mlp_only is None:  # (FlintConfig's default)
            mlp_only = [0, 1]
        if not isinstance(mlp_only, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in mlp_only):
            raise ModelError(f"{where}: mlp_only_layers must be a list of layer indices, got {mlp_only!r}")
        return {"n_experts": as_int(key, cfg.get(key, 256 if flint else 384)),
                "n_experts_per_tok": as_int("num_experts_per_tok", cfg.get("num_experts_per_tok", 6)),
                "moe_intermediate_size": as_int("moe_intermediate_size", cfg.get("moe_intermediate_size", 512)),
                "norm_topk_prob": bool(cfg.get("norm_topk_prob", flint)),
                "decoder_sparse_step": as_int("decoder_sparse_step", cfg.get("decoder_sparse_step", 1)) if flint else 1,
                "mlp_only_layers": tuple(mlp_only),
                "shared_expert_intermediate_size": as_int("shared_expert_intermediate_size",
                                                          cfg.get("shared_expert_intermediate_size",
                                                                  1024 if flint else 512))}
    if arch == "aria_text":  # Aria: every layer's experts intermediate_size wide, top-k then softmax, a shared MLP
        width = as_int("intermediate_size", cfg.get("intermediate_size", 4096))
        return {"n_experts": as_int("moe_num_experts", cfg.get("moe_num_experts", 8)),
                "n_experts_per_tok": as_int("moe_topk", cfg.get("moe_topk", 2)), "moe_intermediate_size": width,
                "norm_topk_prob": True,
                "shared_expert_intermediate_size": width * as_int("moe_num_shared_experts",
                                                                  cfg.get("moe_num_shared_experts", 2))}
    if arch == "mellum":  # Qwen3-MoE's router and experts; dense layers where mlp_layer_types says so
        n = int(need("num_hidden_layers"))
        kinds = cfg.get("mlp_layer_types") or ["sparse"] * n
        if not isinstance(kinds, list) or len(kinds) != n or any(k not in ("dense", "sparse") for k in kinds):
            raise ModelError(f"{where}: mlp_layer_types must list 'dense' / 'sparse' for each of the {n} layers, got "
                             f"{kinds!r}")
        key = "num_experts" if "num_experts" in cfg else "num_local_experts"
        return {"n_experts": as_int(key, cfg.get(key, 64)),
                "n_experts_per_tok": as_int("num_experts_per_tok", cfg.get("num_experts_per_tok", 8)),
                "moe_intermediate_size": as_int("moe_intermediate_size", cfg.get("moe_intermediate_size", 896)),
                "norm_topk_prob": bool(cfg.get("norm_topk_prob", True)),
                "mlp_only_layers": tuple(i for i, k in enumerate(kinds) if k == "dense")}
    if arch == "phimoe":  # Mixtral's experts under the sparsemixer router (top 2), every layer
        jitter = cfg.get("router_jitter_noise", 0.01)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
            raise ModelError(f"{where}: router_jitter_noise must be a number, got {jitter!r}")
        return {"n_experts": as_int("num_local_experts", cfg.get("num_local_experts", 16)),
                "n_experts_per_tok": as_int("num_experts_per_tok", cfg.get("num_experts_per_tok", 2)),
                "moe_intermediate_size": as_int("intermediate_size", need("intermediate_size")),
                "norm_topk_prob": False, "router_jitter_eps": float(jitter),
                "head_bias": bool(cfg.get("lm_head_bias", False))}
    if arch == "minimax_m2":  # GLM-4.5's router with one group and no scaling; Mixtral's experts, every layer
        if cfg.get("scoring_func", "sigmoid") != "sigmoid" or not cfg.get("use_routing_bias", True):
            raise ModelError(f"{where}: minimax_m2 routes by sigmoid scores with a correction bias "
                             f"(scoring_func {cfg.get('scoring_func')!r}, use_routing_bias {cfg.get('use_routing_bias')!r})")
        if cfg.get("shared_intermediate_size", 0):
            raise ModelError(f"{where}: minimax_m2 with a shared expert (shared_intermediate_size) is unsupported")
        if cfg.get("qk_norm_type", "per_layer") != "per_layer" or not cfg.get("use_qk_norm", True):
            raise ModelError(f"{where}: minimax_m2's q/k norms over whole projections are supported "
                             f"(qk_norm_type 'per_layer', use_qk_norm true), got {cfg.get('qk_norm_type')!r} / "
                             f"{cfg.get('use_qk_norm')!r}")
        attn = cfg.get("attn_type_list")
        if attn is not None and any(a != 1 for a in attn):
            raise ModelError(f"{where}: minimax_m2 with linear-attention layers (attn_type_list 0) is unsupported")
        return {"n_experts": as_int("num_local_experts", cfg.get("num_local_experts", 256)),
                "n_experts_per_tok": as_int("num_experts_per_tok", cfg.get("num_experts_per_tok", 8)),
                "moe_intermediate_size": as_int("intermediate_size", need("intermediate_size")),
                "norm_topk_prob": True, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                "use_qk_norm": False}
    if arch == "gpt_oss":  # GptOssConfig maps num_experts to num_local_experts; experts are intermediate_size wide
        key = "num_local_experts" if cfg.get("num_local_experts") is not None else "num_experts"
        return {"n_experts": as_int(key, cfg.get(key, 128)),
                "n_experts_per_tok": as_int("num_experts_per_tok", cfg.get("num_experts_per_tok", 4)),
                "moe_intermediate_size": as_int("intermediate_size", need("intermediate_size")),
                "norm_topk_prob": True}
    if arch in ("olmoe", "flex_olmo"):  # Qwen2-MoE's softmax router over Mixtral's experts, every layer
        flex = arch == "flex_olmo"  # (FlexOlmoConfig's defaults: 5 of 7 experts)
        return {"n_experts": as_int("num_experts", cfg.get("num_experts", 7 if flex else 64)),
                "n_experts_per_tok": as_int("num_experts_per_tok", cfg.get("num_experts_per_tok", 5 if flex else 8)),
                "moe_intermediate_size": as_int("intermediate_size", need("intermediate_size")),
                "norm_topk_prob": bool(cfg.get("norm_topk_prob", False))}
    if arch in GRANITE_ARCHS:  # Mixtral's experts, intermediate_size wide, every layer; Shared's ungated expert
        return {"n_experts": as_int("num_local_experts", cfg.get("num_local_experts", 8)),
                "n_experts_per_tok": as_int("num_experts_per_tok", cfg.get("num_experts_per_tok", 2)),
                "moe_intermediate_size": as_int("intermediate_size", need("intermediate_size")),
                "norm_topk_prob": True,
                "shared_expert_intermediate_size": as_int("shared_intermediate_size",
                                                          cfg.get("shared_intermediate_size", 0))
                if arch in ("granitemoeshared", "granitemoe_swa") else 0}
    if arch == "mixtral":
        inter = as_int("intermediate_size", need("intermediate_size"))
        return {"n_experts": as_int("num_local_experts", need("num_local_experts")),
                "n_experts_per_tok": as_int("num_experts_per_tok", need("num_experts_per_tok")),
                "moe_intermediate_size": inter, "norm_topk_prob": True}
    # Qwen3MoeConfig maps num_experts to num_local_experts, and save_pretrained writes the latter
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    if cfg.get(key) is None:
        raise ModelError(f"{where}: missing required key 'num_experts' (or 'num_local_experts')")
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in mlp_only):
        raise ModelError(f"{where}: mlp_only_layers must be a list of layer indices, got {mlp_only!r}")
    out: dict[str, Any] = {
        "n_experts": as_int(key, need(key)),
        "n_experts_per_tok": as_int("num_experts_per_tok", need("num_experts_per_tok")),
        "moe_intermediate_size": as_int("moe_intermediate_size", need("moe_intermediate_size")),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
        "decoder_sparse_step": as_int("decoder_sparse_step", cfg.get("decoder_sparse_step", 1)),
        "mlp_only_layers": tuple(mlp_only),
    }
    if arch == "qwen2_moe":
        out["shared_expert_intermediate_size"] = as_int("shared_expert_intermediate_size",
                                                        need("shared_expert_intermediate_size"))
    return out
