"""Zyphra's Zamba (v1: ``ZambaForCausalLM``, model_type ``zamba``), as transformers runs it, over the paged KV pool
with state pages.

Every layer is a Mamba block: an RMS norm, then a **multi-head Mamba-1** mixer (``in_proj`` to the input and the gate
*interleaved* channel by channel; one causal depthwise convolution and SiLU over all channels; then per head of
``mamba_expand x hidden / n_mamba_heads`` channels its own ``x_proj`` to a low-rank time step, ``B`` and ``C``, its
own ``dt_proj``, ``A_log`` and ``D``: the selective scan of :mod:`dualpath.model.mamba1` with ``B`` and ``C`` shared
by a head's channels), ``y * silu(gate)`` through ``out_proj``, and a residual. A **hybrid** layer
(``layers_block_type``) first runs the one shared transformer block on ``[hidden, the token embeddings]``: an RMS norm
over ``2 x hidden``, attention without RoPE (heads ``attention_head_dim`` wide, scores scaled by
``(head_dim / 2) ** -0.5``), an RMS norm, a GELU gated MLP, no residual inside; then the layer's own ``linear``, whose
output is added to the Mamba block's input (not to its residual). The shared block is one module, stored once at
the first hybrid layer, when ``tie_word_embeddings`` is true (transformers 5.24 ties the others to it only then);
otherwise each hybrid layer has its own copy, as transformers builds, saves and reads them (:func:`untied_layers`).

A hybrid layer keeps both KV and a Mamba state, so every page holds the block's KV rows and, after them, the state
(:func:`dualpath.model.state_pages.split_page`, as Zamba2's); Mamba-only layers use the state part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec, final_norm_in, final_norm_out
from dualpath.model.layernorm_family import activation, gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeState
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import ConvAct, decode_states, scan_sequences, split_page, state_bytes
from dualpath.model.zamba2 import HybridBlocks, Zamba2State

ARCH = "zamba"
#: ZambaConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "tie_word_embeddings": True, "hidden_size": 3712, "intermediate_size": 14848,
    "num_hidden_layers": 76, "num_attention_heads": 16, "num_key_value_heads": 16, "n_mamba_heads": 2,
    "hidden_act": "gelu", "hidden_mamba_act": "silu", "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    "max_position_embeddings": 4096, "attn_layer_period": 6, "attn_layer_offset": 4, "mamba_d_state": 16,
    "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False,
}
_MAMBA = ("mamba", "linear_attention")


@dataclass(frozen=True)
class ZambaSpec(HybridBlocks, StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (the shared attention's heads and its MLP; ``head_dim`` is ``attention_head_dim``) plus
    the Mamba blocks' fields."""

    both_in_page = True  # (a hybrid layer keeps KV rows and a Mamba state)
    layer_types: tuple[str, ...] = ()  # "mamba" or "hybrid"
    mamba_heads: int = 2
    mamba_state: int = 16
    mamba_kernel: int = 4
    mamba_expand: int = 2
    dt_rank: int = 1
    conv_bias: bool = True
    proj_bias: bool = False
    attention_width: int = 0  # attention_hidden_size: the shared block's input, 2 x hidden_size
    mamba_act: str | None = None  # hidden_mamba_act (its convolution's) by ACTIVATIONS value, None: SiLU

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.mamba_act is None:  # (the dict, so the block keys, as before it was read)
            d.pop("mamba_act")
        return d

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in ("mamba", "hybrid") for t in self.layer_types):
            raise ModelError(f"model config: layers_block_type must name 'mamba' or 'hybrid' for each of the "
                             f"{self.n_layers} layers, got {list(self.layer_types)}")
        if self.mamba_inner % self.mamba_heads:
            raise ModelError(f"model config: mamba_expand x hidden_size ({self.mamba_inner}) must split into "
                             f"n_mamba_heads ({self.mamba_heads})")
        if self.attention_width != 2 * self.hidden_size:
            raise ModelError(f"model config: attention_hidden_size ({self.attention_width}) must be 2 x hidden_size "
                             f"({2 * self.hidden_size}): the shared block reads [hidden, embeddings]")

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.mamba_inner, self.mamba_kernel, 1, self.mamba_inner, self.mamba_state)

    @property
    def rope_by_type(self) -> dict[str, tuple[float, float]]:
        return {}

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["ZambaForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "attention_head_dim": self.head_dim,
            "attention_hidden_size": self.attention_width, "max_position_embeddings": self.max_position,
            "layers_block_type": list(self.layer_types), "n_mamba_heads": self.mamba_heads,
            "mamba_d_state": self.mamba_state, "mamba_d_conv": self.mamba_kernel, "mamba_expand": self.mamba_expand,
            "mamba_dt_rank": self.dt_rank, "mamba_conv_bias": self.conv_bias, "mamba_proj_bias": self.proj_bias,
            "hidden_act": hf_activation(self.activation or "gelu"), "hidden_mamba_act": hf_activation(self.mamba_act),
            "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": None, "use_mamba_kernels": False, "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> ZambaSpec:
    """The spec of a Zamba config (its keys over ZambaConfig's defaults, its derived sizes and default layer pattern
    as transformers derives them)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where, default="gelu")  # (its gated MLP's; the mixer's is hidden_mamba_act)
    mamba_act = gate_activation(cfg, where, "hidden_mamba_act")  # (its Mamba convolutions'; the gate stays SiLU)
    n, hidden = cfg_int(cfg, "num_hidden_layers", where), cfg_int(cfg, "hidden_size", where)
    heads = cfg_int(cfg, "num_attention_heads", where)
    kinds = cfg.get("layers_block_type") or cfg.get("layer_types")
    if kinds is None:
        period, offset = cfg_int(cfg, "attn_layer_period", where), cfg_int(cfg, "attn_layer_offset", where, 0)
        kinds = ["mamba", "mamba", "hybrid"] + ["hybrid" if i % period == offset else "mamba" for i in range(n - 3)]
    if not isinstance(kinds, list) or len(kinds) != n or any(k not in (*_MAMBA, "hybrid") for k in kinds):
        raise ModelError(f"{where}: layers_block_type must name 'mamba' or 'hybrid' for each of the {n} layers "
                         f"(num_hidden_layers), got {kinds!r}")
    rank = cfg.get("mamba_dt_rank")
    rank = -(-hidden // 16) if rank == "auto" else cfg_int({"mamba_dt_rank": rank}, "mamba_dt_rank", where)
    width = cfg.get("attention_hidden_size") or 2 * hidden
    return ZambaSpec(
        architecture=ARCH, activation=act, mamba_act=mamba_act, vocab_size=cfg_int(cfg, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=heads,
        n_kv_heads=cfg_int({"k": cfg.get("num_key_value_heads") or heads}, "k", where),
        head_dim=cfg_int({"attention_head_dim": cfg.get("attention_head_dim") or 2 * hidden // heads},
                         "attention_head_dim", where),
        rms_eps=cfg_num(cfg, "rms_norm_eps", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        layer_types=tuple("hybrid" if k == "hybrid" else "mamba" for k in kinds),
        mamba_heads=cfg_int(cfg, "n_mamba_heads", where), mamba_state=cfg_int(cfg, "mamba_d_state", where),
        mamba_kernel=cfg_int(cfg, "mamba_d_conv", where), mamba_expand=cfg_int(cfg, "mamba_expand", where),
        dt_rank=rank, conv_bias=bool(cfg["mamba_conv_bias"]), proj_bias=bool(cfg["mamba_proj_bias"]),
        attention_width=cfg_int({"attention_hidden_size": width}, "attention_hidden_size", where),
    )


# --- modules -------------------------------------------------------------------------------------------------


class MultiHeadMamba(nn.Module):
    """The multi-head Mamba-1 mixer (module docstring), under the checkpoints' names."""

    def __init__(self, spec: ZambaSpec) -> None:
        super().__init__()
        d, h, n, r, k = spec.mamba_inner, spec.mamba_heads, spec.mamba_state, spec.dt_rank, spec.mamba_kernel
        hd = d // h
        self.conv1d = nn.Conv1d(d, d, k, groups=d, bias=spec.conv_bias, padding=k - 1)
        self.act: ConvAct = activation(spec.mamba_act) if spec.mamba_act else True
        self.in_proj = nn.Linear(spec.hidden_size, 2 * d, bias=spec.proj_bias)
        self.x_proj_weight = nn.Parameter(torch.zeros(h, r + 2 * n, hd))
        self.dt_proj_weight = nn.Parameter(torch.zeros(h, hd, r))
        self.dt_proj_bias = nn.Parameter(torch.zeros(h, hd))
        self.A_log = nn.Parameter(torch.zeros(h, hd, n))
        self.D = nn.Parameter(torch.ones(h, hd))
        self.out_proj = nn.Linear(d, spec.hidden_size, bias=spec.proj_bias)
        self.inner, self.heads, self.head_dim, self.state, self.rank, self.kernel = d, h, hd, n, r, k

    def _selective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolved ``x [T, D]`` -> ``(dt [T, D] fp32 after softplus, B [T, D, N], C [T, D, N])``: each head's ``B``
        and ``C`` repeated over its channels."""
        t = x.shape[0]
        xh = x.view(t, self.heads, self.head_dim)
        p = torch.einsum("hrd,thd->thr", self.x_proj_weight, xh)
        step, b, c = p.split((self.rank, self.state, self.state), dim=-1)
        raw = torch.einsum("hdr,thr->thd", self.dt_proj_weight, step)
        dt = F.softplus(raw + self.dt_proj_bias.float().to(raw.dtype)).float().reshape(t, self.inner)
        b = b.repeat_interleave(self.head_dim, dim=1)
        c = c.repeat_interleave(self.head_dim, dim=1)
        return dt, b, c

    def forward(self, hs: torch.Tensor, batch: Any, pages: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        conv_pages, rec_pages = pages
        proj = self.in_proj(hs).view(hs.shape[0], self.inner, 2)  # (input and gate interleaved per channel)
        xs, z = proj[..., 0].contiguous(), proj[..., 1].contiguous()
        a = -self.A_log.float().exp().reshape(self.inner, self.state)
        d = self.D.reshape(self.inner)
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        if batch.is_decode:
            conv, s0, commit = decode_states(batch, conv_pages, rec_pages, xs, weight, bias, self.act)
            dt, b, c = self._selective(conv)
            s1 = s0[:, 0].float() * (dt[:, :, None] * a).exp() + dt[:, :, None] * b.float() * conv.float()[:, :, None]
            commit(s1[:, None])
            y = (s1.to(c.dtype) * c).sum(-1) + conv * d
            out = (y * F.silu(z)).to(hs.dtype)
        else:
            ys = torch.empty(hs.shape[0], self.inner, dtype=hs.dtype, device=hs.device)

            def run(conv: torch.Tensor, r0: int, r1: int, s: torch.Tensor) -> torch.Tensor:
                dt, b, c = self._selective(conv)
                state = s[0]
                for i in range(conv.shape[0]):
                    state = (dt[i, :, None] * a).exp() * state + dt[i, :, None] * b[i].float() * conv[i].float()[:, None]
                    ys[r0 + i] = ((state.to(conv.dtype) * c[i]).sum(-1) + conv[i] * d).to(ys.dtype)
                return state[None]

            scan_sequences(batch, conv_pages, rec_pages, xs, weight, bias, run, self.act)
            out = ys * F.silu(z)
        return cast(torch.Tensor, self.out_proj(out))


class SharedAttention(nn.Module):
    def __init__(self, spec: ZambaSpec) -> None:
        super().__init__()
        wide, h, hkv, d = spec.attention_width, spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(wide, h * d, bias=False)
        self.k_proj = nn.Linear(wide, hkv * d, bias=False)
        self.v_proj = nn.Linear(wide, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=False)


class Mlp(nn.Module):
    def __init__(self, spec: ZambaSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.act = activation(spec.activation or "gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


class SharedBlock(nn.Module):
    def __init__(self, spec: ZambaSpec) -> None:
        super().__init__()
        self.self_attn = SharedAttention(spec)
        self.feed_forward = Mlp(spec)
        self.input_layernorm = RMSNorm(spec.attention_width, spec.rms_eps)
        self.pre_ff_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)


class MambaLayer(nn.Module):
    def __init__(self, spec: ZambaSpec) -> None:
        super().__init__()
        self.mamba = MultiHeadMamba(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)


class HybridLayer(nn.Module):
    def __init__(self, spec: ZambaSpec, shared: SharedBlock) -> None:
        super().__init__()
        self.shared_transf = shared  # (one module for every hybrid layer: stored once, at the first)
        self.linear = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)
        self.mamba_decoder = MambaLayer(spec)


def _layers(spec: ZambaSpec, own: frozenset[int]) -> list[nn.Module]:
    """The layers; the hybrid layers share one block, except those in ``own``, which keep their own copy."""
    shared = SharedBlock(spec)
    return [(HybridLayer(spec, SharedBlock(spec) if i in own else shared) if kind == "hybrid" else MambaLayer(spec))
            for i, kind in enumerate(spec.layer_types)]


def untied_layers(spec: ZambaSpec, names: Iterable[str] | None) -> frozenset[int]:
    """The hybrid layers past the first with their own copy of the shared block: those a checkpoint stores one for
    (``names``), or, for random weights, every one unless ``tie_word_embeddings`` (transformers ties them only
    then)."""
    later = set(spec.hybrid_layers[1:])
    if names is None:
        return frozenset() if spec.tie_embeddings else frozenset(later)
    stored = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.") and ".shared_transf." in n}
    return frozenset(stored & later)


class ZambaModel(HybridDecoder):
    """Zamba (module docstring) over a paged KV pool with pages holding KV rows and a Mamba state."""

    def __init__(self, spec: ZambaSpec, device: str | torch.device = "cpu", backend: str = "auto",
                 own_blocks: frozenset[int] = frozenset()) -> None:
        super().__init__()
        layers = _layers(spec, own_blocks)
        self._setup(spec, Backbone(spec, lambda i: layers[i]), device, backend)
        self.spec: ZambaSpec = spec

    @torch.no_grad()
    def prefill_begin(self, batch: Any) -> ForwardState:
        st = cast(TypedRopeState, super().prefill_begin(batch))
        return Zamba2State(batch=st.batch, hidden=st.hidden, cos=st.cos, sin=st.sin, tables=st.tables,
                           embeddings=st.hidden.clone())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mamba_layer = mod.mamba_decoder if isinstance(mod, HybridLayer) else mod
        mixer = cast(MultiHeadMamba, mamba_layer.mamba)
        kv, conv_pages, rec_pages = split_page(kv_layer, spec.n_kv_heads, spec.head_dim, mixer.inner, mixer.kernel,
                                               1, mixer.inner, mixer.state)
        x = st.hidden
        if isinstance(mod, HybridLayer):
            x = x + mod.linear(self._shared(mod.shared_transf, cast(Zamba2State, st), kv))
        st.hidden = st.hidden + mixer(mamba_layer.input_layernorm(x), b, (conv_pages, rec_pages))
        state.next_layer += 1

    def _shared(self, blk: SharedBlock, st: Zamba2State, kv: torch.Tensor) -> torch.Tensor:
        """The shared transformer block on ``[hidden, embeddings]`` (no residual inside it)."""
        spec = self.spec
        assert st.embeddings is not None
        x = blk.input_layernorm(torch.cat((st.hidden, st.embeddings), dim=-1))
        attn = blk.self_attn
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        q, k, v = attn.q_proj(x).view(n, hq, d), attn.k_proj(x).view(n, hkv, d), attn.v_proj(x).view(n, hkv, d)
        o = attn.o_proj(self.attend(q, k, v, kv, st.batch, (d / 2) ** -0.5).reshape(n, hq * d))
        return cast(torch.Tensor, blk.feed_forward(blk.pre_ff_layernorm(o)))


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's ``model.final_layernorm`` as our ``model.norm``."""
    return final_norm_in(tensors)


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``model.norm`` under the checkpoint's ``model.final_layernorm``."""
    return final_norm_out(tensors)
