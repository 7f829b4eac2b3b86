"""Zyphra's Zamba2 (``Zamba2ForCausalLM``, model_type ``zamba2``), as transformers runs it, over the paged KV pool with
state pages.

Every layer is a Mamba-2 block (:class:`dualpath.model.mamba2.Mamba2Mixer` behind an RMS norm, its ``dt`` clamped at
``time_step_min`` in a prefill as transformers' chunked scan clamps it; the gated norm's epsilon 1e-5). A **hybrid**
layer (``layers_block_type``) first runs a *shared* transformer block on ``[hidden, the token embeddings]`` (``2 x
hidden_size`` wide): an RMS norm, attention whose heads are ``2 hidden / num_attention_heads`` wide with scores scaled by
``(head_dim / 2) ** -0.5`` (RoPE with ``use_mem_rope``), an RMS norm, a GELU gated MLP; then ``linear``, whose output
is added to the Mamba block's input. The ``num_mem_blocks`` shared blocks take turns over the hybrid layers (the
checkpoints store each once, at its first hybrid layer; a checkpoint that stores a later layer's copy, as
transformers writes them with one block, gets that copy: :func:`untied_layers`), each invocation with its own low-rank
adapters on the MLP's ``gate_up_proj`` and, with ``use_shared_attention_adapter``, on q / k / v.

A hybrid layer keeps both KV and a Mamba state, so every page holds the block's KV rows and, after them, the state
(:func:`dualpath.model.state_pages.split_page`, as Falcon-H1's); Mamba-only layers use the state part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec, final_norm_in, final_norm_out
from dualpath.model.layernorm_family import activation, gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch, TypedRopeState, _rope
from dualpath.model.mamba2 import Mamba2Mixer
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import split_page, state_bytes

ARCH = "zamba2"
#: Zamba2Config's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "max_position_embeddings": 4096, "hidden_size": 2560, "num_hidden_layers": 54,
    "mamba_d_state": 64, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_ngroups": 1, "time_step_min": 0.001,
    "n_mamba_heads": 8, "add_bias_linear": False, "hidden_act": "gelu", "num_attention_heads": 32,
    "num_mem_blocks": 1, "use_shared_attention_adapter": False, "adapter_rank": 128, "use_mem_rope": False,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "use_long_context": False, "bos_token_id": 1,
    "eos_token_id": 2,
}
#: the Mamba blocks' names in layers_block_type (transformers writes linear_attention)
_MAMBA = ("mamba", "linear_attention")


class HybridBlocks:
    """What Zamba's and Zamba2's specs share: the layers with a shared transformer block and the Mamba width."""

    layer_types: tuple[str, ...]
    mamba_expand: int
    hidden_size: int

    @property
    def hybrid_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "hybrid")

    @property
    def mamba_inner(self) -> int:
        return self.mamba_expand * self.hidden_size


@dataclass(frozen=True)
class Zamba2Spec(HybridBlocks, StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (the shared attention's heads, ``2 x hidden / heads`` wide, and its MLP) plus the Mamba
    blocks' and the shared blocks' fields."""

    both_in_page = True  # (a hybrid layer keeps KV rows and a Mamba state)
    layer_types: tuple[str, ...] = ()  # "mamba" or "hybrid"
    mamba_heads: int = 8
    mamba_groups: int = 1
    mamba_state: int = 64
    mamba_kernel: int = 4
    mamba_expand: int = 2
    dt_min: float = 0.001
    proj_bias: bool = False
    mem_blocks: int = 1
    attn_adapters: bool = False
    adapter_rank: int = 128
    use_rope: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in ("mamba", "hybrid") for t in self.layer_types):
            raise ModelError(f"model config: layers_block_type must name 'mamba' or 'hybrid' for each of the "
                             f"{self.n_layers} layers, got {list(self.layer_types)}")
        inner = self.mamba_expand * self.hidden_size
        if inner % self.mamba_heads or self.mamba_heads % self.mamba_groups:
            raise ModelError(f"model config: mamba_expand x hidden_size ({inner}) must split into n_mamba_heads "
                             f"({self.mamba_heads}), and those into mamba_ngroups ({self.mamba_groups})")
        if self.mem_blocks < 1 or self.adapter_rank < 1:
            raise ModelError("model config: num_mem_blocks and adapter_rank must be positive")
        if self.attn_adapters and self.n_heads * self.head_dim != 2 * self.hidden_size:
            raise ModelError(f"model config: use_shared_attention_adapter needs num_attention_heads x attention_head_dim "
                             f"({self.n_heads} x {self.head_dim}) = 2 x hidden_size ({2 * self.hidden_size}): each "
                             "adapter adds to q, k and v the block's input width (transformers fails on any other)")
        if self.attn_adapters and self.n_kv_heads != self.n_heads:
            raise ModelError(f"model config: use_shared_attention_adapter needs num_key_value_heads = "
                             f"num_attention_heads (its adapters add a {2 * self.hidden_size}-wide term to k and v; "
                             f"transformers cannot run {self.n_kv_heads} of {self.n_heads} either)")

    @property
    def state_bytes(self) -> int:
        conv = self.mamba_inner + 2 * self.mamba_groups * self.mamba_state
        return state_bytes(conv, self.mamba_kernel, self.mamba_heads, self.mamba_inner // self.mamba_heads,
                           self.mamba_state)

    @property
    def rope_by_type(self) -> dict[str, tuple[float, float]]:
        return {"hybrid": (self.rope_theta, 1.0)} if self.use_rope else {}

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["Zamba2ForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "attention_head_dim": self.head_dim,
            "max_position_embeddings": self.max_position,
            "layers_block_type": list(self.layer_types), "mamba_d_state": self.mamba_state,
            "mamba_d_conv": self.mamba_kernel, "mamba_expand": self.mamba_expand, "mamba_ngroups": self.mamba_groups,
            "n_mamba_heads": self.mamba_heads, "time_step_min": self.dt_min, "add_bias_linear": self.proj_bias,
            "hidden_act": hf_activation(self.activation or "gelu"), "num_mem_blocks": self.mem_blocks,
            "use_shared_attention_adapter": self.attn_adapters, "adapter_rank": self.adapter_rank,
            "use_mem_rope": self.use_rope, "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_eps, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> Zamba2Spec:
    """The spec of a Zamba2 config (its keys over Zamba2Config's defaults, its derived sizes as transformers derives
    them; ``layers_block_type`` names every one of ``num_hidden_layers``, as transformers checks)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where, default="gelu")  # (its shared blocks' gated MLPs')
    if not isinstance(cfg["use_long_context"], bool):
        raise ModelError(f"{where}: use_long_context must be true or false, got {cfg['use_long_context']!r}")
    if cfg["use_long_context"]:  # (transformers: a 16K context; the RoPE base is the config's rope_theta as
        cfg["max_position_embeddings"] = 16384  # written, since it saves the rescaled base a long context runs at)
    n, hidden = cfg_int(cfg, "num_hidden_layers", where), cfg_int(cfg, "hidden_size", where)
    heads = cfg_int(cfg, "num_attention_heads", where)
    kinds = cfg.get("layers_block_type") or cfg.get("layer_types")
    if kinds is None:  # (Zamba2Config's default: 54 layers, which num_hidden_layers must then be)
        kinds = ["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + ["mamba"] * 3 + \
            ["hybrid"] + ["mamba"] * 2
    if not isinstance(kinds, list) or len(kinds) != n or any(k not in (*_MAMBA, "hybrid") for k in kinds):
        raise ModelError(f"{where}: layers_block_type must name 'mamba' or 'hybrid' for each of the {n} layers "
                         f"(num_hidden_layers), got {kinds!r}")
    if cfg.get("mamba_headdim") is not None:
        head, n_heads = cfg_int(cfg, "mamba_headdim", where), cfg_int(cfg, "n_mamba_heads", where)
        expand = cfg_int(cfg, "mamba_expand", where)
        if head * n_heads != expand * hidden:
            raise ModelError(f"{where}: mamba_headdim ({head}) must be mamba_expand x hidden_size / n_mamba_heads "
                             f"({expand} x {hidden} / {n_heads}; transformers fails on any other)")
    width = cfg.get("attention_hidden_size")
    if width is not None and width != 2 * hidden:  # (transformers sizes the shared block by it and fails on others)
        raise ModelError(f"{where}: attention_hidden_size ({width!r}) must be 2 x hidden_size ({2 * hidden}): the "
                         "shared block reads [hidden, embeddings]")
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {ARCH}, got {rope!r}")
    return Zamba2Spec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int({"i": cfg.get("intermediate_size") or 4 * hidden}, "i", where), n_layers=n,
        n_heads=heads, n_kv_heads=cfg_int({"k": cfg.get("num_key_value_heads") or heads}, "k", where),
        head_dim=cfg_int({"attention_head_dim": cfg.get("attention_head_dim") or 2 * hidden // heads},
                         "attention_head_dim", where), rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        rope_theta=cfg_num({"rope_theta": rope.get("rope_theta", 10000.0)}, "rope_theta", where),
        max_position=cfg_int(cfg, "max_position_embeddings", where), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=tuple("hybrid" if k == "hybrid" else "mamba" for k in kinds),
        mamba_heads=cfg_int(cfg, "n_mamba_heads", where), mamba_groups=cfg_int(cfg, "mamba_ngroups", where),
        mamba_state=cfg_int(cfg, "mamba_d_state", where), mamba_kernel=cfg_int(cfg, "mamba_d_conv", where),
        mamba_expand=cfg_int(cfg, "mamba_expand", where), dt_min=cfg_num(cfg, "time_step_min", where, positive=False),
        proj_bias=bool(cfg["add_bias_linear"]), mem_blocks=cfg_int(cfg, "num_mem_blocks", where),
        attn_adapters=bool(cfg["use_shared_attention_adapter"]), adapter_rank=cfg_int(cfg, "adapter_rank", where),
        use_rope=bool(cfg["use_mem_rope"]),
    )


# --- modules -------------------------------------------------------------------------------------------------


def _adapters(spec: Zamba2Spec, block: int, width_in: int, width_out: int) -> nn.ModuleList:
    """One low-rank adapter per hybrid invocation this block serves (``i % num_mem_blocks == block``), identities in
    the other slots (the checkpoints' ``*_adapter_list.{i}.{0,1}``)."""
    return nn.ModuleList(
        nn.Sequential(nn.Linear(width_in, spec.adapter_rank, bias=False), nn.Linear(spec.adapter_rank, width_out,
                                                                                     bias=False))
        if i % spec.mem_blocks == block else nn.Identity() for i in range(len(spec.hybrid_layers)))


class SharedAttention(nn.Module):
    def __init__(self, spec: Zamba2Spec, block: int) -> None:
        super().__init__()
        wide, h, hkv, d = 2 * spec.hidden_size, spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(wide, h * d, bias=False)
        self.k_proj = nn.Linear(wide, hkv * d, bias=False)
        self.v_proj = nn.Linear(wide, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=False)
        if spec.attn_adapters:  # (each maps the block's input to itself: q, k and v are as wide, Zamba2Spec checks)
            self.linear_q_adapter_list = _adapters(spec, block, wide, wide)
            self.linear_k_adapter_list = _adapters(spec, block, wide, wide)
            self.linear_v_adapter_list = _adapters(spec, block, wide, wide)


class SharedMlp(nn.Module):
    def __init__(self, spec: Zamba2Spec, block: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.proj_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.proj_bias)
        self.gate_up_proj_adapter_list = _adapters(spec, block, spec.hidden_size, 2 * spec.intermediate_size)
        self.act = activation(spec.activation or "gelu")

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        gate, up = (self.gate_up_proj(x) + self.gate_up_proj_adapter_list[slot](x)).chunk(2, dim=-1)
        return cast(torch.Tensor, self.down_proj(self.act(gate) * up))


class SharedBlock(nn.Module):
    def __init__(self, spec: Zamba2Spec, block: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(2 * spec.hidden_size, spec.rms_eps)
        self.self_attn = SharedAttention(spec, block)
        self.pre_ff_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.feed_forward = SharedMlp(spec, block)


def _mixer(spec: Zamba2Spec) -> Mamba2Mixer:
    return Mamba2Mixer(spec.hidden_size, spec.mamba_inner, spec.mamba_heads, spec.mamba_groups, spec.mamba_state,
                       spec.mamba_kernel, 1e-5, conv_bias=True, proj_bias=spec.proj_bias, dt_min=spec.dt_min)


class MambaLayer(nn.Module):
    def __init__(self, spec: Zamba2Spec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mamba = _mixer(spec)


class HybridLayer(nn.Module):
    def __init__(self, spec: Zamba2Spec, shared: SharedBlock) -> None:
        super().__init__()
        self.shared_transformer = shared  # (the same module at every layer its block serves: stored once)
        self.linear = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)
        self.mamba_decoder = MambaLayer(spec)


def _layers(spec: Zamba2Spec, own: frozenset[int]) -> list[nn.Module]:
    """The layers; hybrid layer ``i`` uses shared block ``i % num_mem_blocks``, the same module wherever it serves,
    except the layers in ``own``, which keep their own copy of it."""
    blocks: list[SharedBlock] = []
    out: list[nn.Module] = []
    for layer, kind in enumerate(spec.layer_types):
        if kind == "mamba":
            out.append(MambaLayer(spec))
            continue
        i = sum(1 for m in out if isinstance(m, HybridLayer))
        if len(blocks) < spec.mem_blocks:
            blocks.append(SharedBlock(spec, len(blocks)))
        block = i % spec.mem_blocks
        out.append(HybridLayer(spec, SharedBlock(spec, block) if layer in own else blocks[block]))
    return out


def untied_layers(spec: Zamba2Spec, names: Iterable[str]) -> frozenset[int]:
    """The hybrid layers past their block's first that a checkpoint stores a shared block for: transformers 5.24
    ties the later layers of each block to its first only with ``num_mem_blocks`` above 1, and otherwise saves
    (and reads) every hybrid layer's own copy."""
    firsts = set(spec.hybrid_layers[:spec.mem_blocks])
    stored = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.") and ".shared_transformer." in n}
    return frozenset(stored - firsts)


@dataclass
class Zamba2State(TypedRopeState):
    """:class:`TypedRopeState` plus the token embeddings every shared block reads."""

    embeddings: torch.Tensor | None = None


class Zamba2Model(HybridDecoder):
    """Zamba2 (module docstring) over a paged KV pool with pages holding KV rows and a Mamba state."""

    def __init__(self, spec: Zamba2Spec, device: str | torch.device = "cpu", backend: str = "auto",
                 own_blocks: frozenset[int] = frozenset()) -> None:
        super().__init__()
        layers = _layers(spec, own_blocks)
        self._setup(spec, Backbone(spec, lambda i: layers[i]), device, backend)
        self.spec: Zamba2Spec = spec
        self._slot = {layer: i for i, layer in enumerate(spec.hybrid_layers)}

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        st = cast(TypedRopeState, super().prefill_begin(batch))
        return Zamba2State(batch=st.batch, hidden=st.hidden, cos=st.cos, sin=st.sin, tables=st.tables,
                           embeddings=st.hidden.clone())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        hkv, d = spec.n_kv_heads, spec.head_dim
        mamba_layer = mod.mamba_decoder if isinstance(mod, HybridLayer) else mod
        mixer = cast(Mamba2Mixer, mamba_layer.mamba)
        kv, conv_pages, rec_pages = split_page(kv_layer, hkv, d, mixer.conv_dim, mixer.kernel, mixer.heads,
                                               mixer.head_dim, mixer.state)
        x = st.hidden
        if isinstance(mod, HybridLayer):
            x = x + mod.linear(self._shared(mod.shared_transformer, layer, cast(Zamba2State, st), kv))
        st.hidden = st.hidden + mixer(mamba_layer.input_layernorm(x), b, kv_layer, pages=(conv_pages, rec_pages))
        state.next_layer += 1

    def _shared(self, blk: SharedBlock, layer: int, st: Zamba2State, kv: torch.Tensor) -> torch.Tensor:
        """The shared transformer block at hybrid layer ``layer`` (its adapters' slot), on ``[hidden, embeddings]``."""
        spec, slot = self.spec, self._slot[layer]
        assert st.embeddings is not None
        x = blk.input_layernorm(torch.cat((st.hidden, st.embeddings), dim=-1))
        attn = blk.self_attn
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if spec.attn_adapters:
            q = q + attn.linear_q_adapter_list[slot](x)
            k = k + attn.linear_k_adapter_list[slot](x)
            v = v + attn.linear_v_adapter_list[slot](x)
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        q, k, v = q.view(n, hq, d), k.view(n, hkv, d), v.view(n, hkv, d)
        if spec.use_rope:
            cos, sin = st.tables["hybrid"]
            q, k = _rope(q, cos[:, None, :], sin[:, None, :]), _rope(k, cos[:, None, :], sin[:, None, :])
        o = attn.o_proj(self.attend(q, k, v, kv, st.batch, (d / 2) ** -0.5).reshape(n, hq * d))
        return cast(torch.Tensor, blk.feed_forward(blk.pre_ff_layernorm(o), slot))


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's ``model.final_layernorm`` as our ``model.norm``."""
    return final_norm_in(tensors)


def tensors_out(spec: Zamba2Spec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``model.norm`` under the checkpoint's ``model.final_layernorm``; with one shared block, a copy of it under
    every hybrid layer that shares it (transformers 5.24 reads each layer's own copy then, :func:`untied_layers`)."""
    out = final_norm_out(tensors)
    if spec.mem_blocks == 1 and spec.hybrid_layers:
        first = f"model.layers.{spec.hybrid_layers[0]}.shared_transformer."
        for layer in spec.hybrid_layers[1:]:
            mine = f"model.layers.{layer}.shared_transformer."
            if not any(k.startswith(mine) for k in out):
                out.update({mine + k[len(first):]: v.clone() for k, v in list(out.items()) if k.startswith(first)})
    return out
