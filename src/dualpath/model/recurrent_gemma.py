"""Google's RecurrentGemma (Griffin: ``RecurrentGemmaForCausalLM``, model_type ``recurrent_gemma``), as transformers runs
it, over the paged KV pool with state pages.

Layers repeat ``block_types`` (by default recurrent, recurrent, attention). Each is a residual block: Gemma's RMS norm
(``1 + weight``, in fp32) before a temporal block and before a gated MLP (``gelu_pytorch_tanh``, biased, half of
``intermediate_size`` wide).

* **recurrent blocks**: ``y = gelu(linear_y(x))``; ``linear_x(x)`` through a causal depthwise convolution with a bias
  (``conv1d_width`` taps, no activation) into the **RG-LRU**: per channel an input gate and a recurrence gate from
  block-diagonal (one block per head) linear maps with biases, ``log a = -8 r softplus(recurrent_param)``,
  ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)`` accumulated in fp32, the state reset at position 0 (``a = 0``, no
  normalization); then ``linear_out(h * y)``. Its state (the convolution's last ``conv1d_width - 1`` inputs and ``h``)
  lives in the layer's pages (:mod:`dualpath.model.state_pages`); a prefill scans token by token (the decay differs
  per channel), vectorized over channels.
* **attention blocks**: local attention over the last ``attention_window_size`` positions, GQA, RoPE on the first
  half of each head (``partial_rotary_factor``), ``o_proj`` with a bias.

Embeddings are scaled by ``sqrt(hidden_size)`` rounded to bf16 (transformers' buffer), the final norm is
``final_norm``, the head is tied and the logits are soft-capped: ``tanh(logits / cap) * cap``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.gemma4 import layer_view
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec
from dualpath.model.layernorm_family import activation, gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, _rope
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import decode_states, scan_sequences, state_bytes, state_views

ARCH = "recurrent_gemma"
BLOCKS = ("recurrent", "attention")
#: RecurrentGemmaConfig's defaults (the 2B model's shape)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 256000, "hidden_size": 2560, "num_hidden_layers": 26, "num_attention_heads": 10,
    "attention_window_size": 2048, "conv1d_width": 4, "logits_soft_cap": 30.0, "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh", "block_types": ["recurrent", "recurrent", "attention"],
    "attention_bias": False, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
    "max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class RecurrentGemmaSpec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (the attention blocks' shape; ``intermediate_size``: the MLP's width as built) plus the
    recurrent blocks' fields."""

    layer_types: tuple[str, ...] = ()
    window: int = 2048
    lru_width: int = 0
    conv_width: int = 4
    soft_cap: float = 30.0
    partial_rotary: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in BLOCKS for t in self.layer_types):
            raise ModelError(f"model config: block_types must name 'recurrent' or 'attention' blocks, got "
                             f"{list(self.layer_types)} for {self.n_layers} layers")
        if self.lru_width <= 0 or self.lru_width % self.n_heads:
            raise ModelError(f"model config: lru_width ({self.lru_width}) must be a positive multiple of "
                             f"num_attention_heads ({self.n_heads}): the RG-LRU's gates are one block per head")
        if self.conv_width < 1 or self.window <= 0 or not self.soft_cap > 0:
            raise ModelError("model config: conv1d_width, attention_window_size and logits_soft_cap must be positive")
        if int(self.head_dim * self.partial_rotary) < 2:
            raise ModelError(f"model config: partial_rotary_factor {self.partial_rotary} rotates no pair of a "
                             f"{self.head_dim}-wide head")

    @property
    def state_bytes(self) -> int:
        """fp32: the convolution's last inputs ``[lru_width, conv1d_width - 1]`` and ``h [lru_width]``."""
        return state_bytes(self.lru_width, self.conv_width, 1, 1, self.lru_width)

    @property
    def rope_by_type(self) -> dict[str, tuple[float, float]]:
        return {"attention": (self.rope_theta, self.partial_rotary)}

    def layer_window(self, layer: int) -> int | None:
        return self.window if self.layer_types[layer] == "attention" else None

    def to_hf_config(self) -> dict[str, Any]:
        period = _period(self.layer_types)
        return {
            "architectures": ["RecurrentGemmaForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": 2 * self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "lru_width": self.lru_width,
            "attention_window_size": self.window, "conv1d_width": self.conv_width,
            "logits_soft_cap": self.soft_cap, "rms_norm_eps": self.rms_eps,
            "hidden_activation": hf_activation(self.activation or "gelu_tanh"), "block_types": list(period),
            "attention_bias": self.attention_bias, "tie_word_embeddings": self.tie_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }


def _period(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest ``block_types`` whose repetition gives ``kinds``."""
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return kinds[:p]
    return kinds


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> RecurrentGemmaSpec:
    """The spec of a RecurrentGemma config (its keys over RecurrentGemmaConfig's defaults, its derived sizes as
    transformers derives them)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where, "hidden_activation", default="gelu_pytorch_tanh")  # (MLP gate and y branch)
    n, hidden = cfg_int(cfg, "num_hidden_layers", where), cfg_int(cfg, "hidden_size", where)
    heads = cfg_int(cfg, "num_attention_heads", where)
    blocks = cfg.get("block_types")
    if not isinstance(blocks, list | tuple) or not blocks or any(b not in BLOCKS for b in blocks):
        raise ModelError(f"{where}: block_types must be a non-empty list of 'recurrent' / 'attention', got {blocks!r}")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {ARCH}, got {rope!r}")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    return RecurrentGemmaSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int({"i": cfg.get("intermediate_size", 3 * hidden)}, "i", where) // 2, n_layers=n,
        n_heads=heads, n_kv_heads=cfg_int({"k": cfg.get("num_key_value_heads") or heads}, "k", where),
        head_dim=cfg_int({"head_dim": cfg.get("head_dim") or hidden // heads}, "head_dim", where),
        rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        rope_theta=cfg_num({"rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0))}, "rope_theta",
                           where),
        max_position=cfg_int(cfg, "max_position_embeddings", where), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_bias=bool(cfg["attention_bias"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        layer_types=tuple(blocks[i % len(blocks)] for i in range(n)),
        window=cfg_int(cfg, "attention_window_size", where),
        lru_width=cfg_int({"lru_width": cfg.get("lru_width") or hidden}, "lru_width", where),
        conv_width=cfg_int(cfg, "conv1d_width", where), soft_cap=cfg_num(cfg, "logits_soft_cap", where),
        partial_rotary=cfg_num({"partial_rotary_factor": partial}, "partial_rotary_factor", where),
    )


# --- modules -------------------------------------------------------------------------------------------------


class RgLru(nn.Module):
    """The RG-LRU's parameters (module docstring), under the checkpoints' names."""

    def __init__(self, spec: RecurrentGemmaSpec) -> None:
        super().__init__()
        h, w = spec.n_heads, spec.lru_width // spec.n_heads
        self.recurrent_param = nn.Parameter(torch.zeros(spec.lru_width))
        self.input_gate_weight = nn.Parameter(torch.zeros(h, w, w))
        self.input_gate_bias = nn.Parameter(torch.zeros(h, w))
        self.recurrent_gate_weight = nn.Parameter(torch.zeros(h, w, w))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(h, w))
        self.heads, self.block = h, w

    def gates(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the convolved ``x [N, W]`` at ``positions [N]``: ``(a [N, W] fp32, normalized input [N, W])`` (the
        input in ``x``'s dtype, as transformers rounds it): ``h_t = a_t h_{t-1} + input_t``."""
        n = x.shape[0]
        blocks = x.reshape(n, self.heads, self.block).transpose(0, 1)  # [H, N, w]
        i = torch.sigmoid(torch.baddbmm(self.input_gate_bias[:, None, :], blocks, self.input_gate_weight)
                          .transpose(0, 1).reshape(n, -1))
        r = torch.sigmoid(torch.baddbmm(self.recurrent_gate_bias[:, None, :], blocks, self.recurrent_gate_weight)
                          .transpose(0, 1).reshape(n, -1))
        log_a = -8.0 * r * F.softplus(self.recurrent_param)
        reset = (positions == 0)[:, None]
        multiplier = torch.where(reset, torch.ones_like(log_a), torch.sqrt(1 - torch.exp(2 * log_a)))
        a = torch.where(reset, torch.zeros_like(log_a), torch.exp(log_a))
        return a.float(), (x * i) * multiplier.to(x.dtype)


class RecurrentBlock(nn.Module):
    def __init__(self, spec: RecurrentGemmaSpec) -> None:
        super().__init__()
        w, k = spec.lru_width, spec.conv_width
        self.linear_y = nn.Linear(spec.hidden_size, w)
        self.linear_x = nn.Linear(spec.hidden_size, w)
        self.linear_out = nn.Linear(w, spec.hidden_size)
        self.conv_1d = nn.Conv1d(w, w, k, groups=w, padding=k - 1)
        self.rg_lru = RgLru(spec)
        self.width, self.taps = w, k
        self.act = activation(spec.activation or "gelu_tanh")

    def forward(self, x: torch.Tensor, batch: Any, kv_layer: torch.Tensor) -> torch.Tensor:
        conv_pages, rec_pages = state_views(kv_layer, self.width, self.taps, 1, 1, self.width)
        y = self.act(self.linear_y(x))
        xb = self.linear_x(x)
        weight, bias = self.conv_1d.weight[:, 0], self.conv_1d.bias
        positions = batch.positions.to(x.device)
        if batch.is_decode:
            conv, s0, commit = decode_states(batch, conv_pages, rec_pages, xb, weight, bias, act=False)
            a, inp = self.rg_lru.gates(conv, positions)
            h = a * s0.view(-1, self.width) + inp.float()
            commit(h.view(-1, 1, 1, self.width))
            out = h.to(x.dtype)
        else:
            out = torch.empty_like(xb)

            def run(conv: torch.Tensor, r0: int, r1: int, s: torch.Tensor) -> torch.Tensor:
                a, inp = self.rg_lru.gates(conv, positions[r0:r1])
                h = s.view(self.width)
                for t in range(r1 - r0):  # (a decay per channel: token by token, vectorized over channels)
                    h = a[t] * h + inp[t].float()
                    out[r0 + t] = h.to(out.dtype)
                return h.view(s.shape)

            scan_sequences(batch, conv_pages, rec_pages, xb, weight, bias, run, act=False)
        return cast(torch.Tensor, self.linear_out(out * y))


class Attention(nn.Module):
    def __init__(self, spec: RecurrentGemmaSpec) -> None:
        super().__init__()
        h, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=True)


class Mlp(nn.Module):
    def __init__(self, spec: RecurrentGemmaSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.act = activation(spec.activation or "gelu_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


class ResidualBlock(nn.Module):
    def __init__(self, spec: RecurrentGemmaSpec, layer: int) -> None:
        super().__init__()
        self.temporal_pre_norm = RMSNorm(spec.hidden_size, spec.rms_eps, offset=True)
        self.temporal_block: nn.Module = (RecurrentBlock(spec) if spec.layer_types[layer] == "recurrent"
                                          else Attention(spec))
        self.channel_pre_norm = RMSNorm(spec.hidden_size, spec.rms_eps, offset=True)
        self.mlp_block = Mlp(spec)


class RecurrentGemmaModel(HybridDecoder):
    """RecurrentGemma (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: RecurrentGemmaSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        backbone = Backbone(spec, lambda i: ResidualBlock(spec, i), RMSNorm(spec.hidden_size, spec.rms_eps,
                                                                            offset=True))
        self._setup(spec, backbone, device, backend)
        self.spec: RecurrentGemmaSpec = spec

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings times ``sqrt(hidden_size)`` rounded to bf16 (transformers' normalizer), in the compute dtype."""
        scale = torch.tensor(self.spec.hidden_size ** 0.5, dtype=torch.bfloat16).to(self.spec.torch_dtype)
        return cast(torch.Tensor, self.model.embed_tokens(ids) * scale.to(ids.device))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(h))
        cap = self.spec.soft_cap
        return cast(torch.Tensor, (torch.tanh(logits / cap) * cap).float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(ResidualBlock, mod)
        spec, b = self.spec, state.batch
        x = mod.temporal_pre_norm(st.hidden)
        if spec.layer_types[layer] == "recurrent":
            out = cast(RecurrentBlock, mod.temporal_block)(x, b, kv_layer)
        else:
            attn = cast(Attention, mod.temporal_block)
            n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
            cos, sin = st.tables["attention"]
            cos, sin = cos[:, None, :], sin[:, None, :]
            q = _rope(attn.q_proj(x).view(n, hq, d), cos, sin)
            k = _rope(attn.k_proj(x).view(n, hkv, d), cos, sin)
            kv = layer_view(kv_layer, hkv, d)
            o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv, b, d ** -0.5, window=self.windows[layer])
            out = attn.o_proj(o.reshape(n, hq * d))
        h = st.hidden + out
        st.hidden = h + mod.mlp_block(mod.channel_pre_norm(h))
        state.next_layer += 1


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's ``model.final_norm`` as our ``model.norm``."""
    return {("model.norm." + k[len("model.final_norm."):] if k.startswith("model.final_norm.") else k): v
            for k, v in tensors.items()}


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``model.norm`` under the checkpoint's ``model.final_norm``."""
    return {("model.final_norm." + k[len("model.norm."):] if k.startswith("model.norm.") else k): v
            for k, v in tensors.items()}
