"""Mamba (``MambaForCausalLM``, model_type ``mamba``) and Falcon-Mamba (``FalconMambaForCausalLM``, ``falcon_mamba``),
as transformers runs them, over state pages (:mod:`dualpath.model.state_pages`).

Each block: an RMS norm, the selective-scan mixer, a residual. The mixer: ``in_proj`` to ``x`` and the gate ``z``; a
causal depthwise convolution (with its bias) and SiLU on ``x``; ``x_proj`` to a low-rank time step and ``B``, ``C``
(Falcon-Mamba normalizes the three by a weightless RMS norm); ``dt = softplus(dt_proj(step))``; per channel ``d`` and
state ``n``, with ``A = -exp(A_log)`` ``[D, N]``::

    h[d, n] <- exp(dt[d] A[d, n]) h[d, n] + dt[d] B[n] x[d];   y[d] = sum_n h[d, n] C[n] + D[d] x[d]

then ``y * silu(z)`` through ``out_proj``. The state is ``[D, N]`` per layer (plus the convolution's last inputs), kept
in the layer's pages; its decay differs per element, so a prefill scans token by token (vectorized over channels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm
from dualpath.model.moe import Activation, activation_of
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import (
    ConvAct,
    decode_states,
    scan_sequences,
    state_bytes,
    state_views,
)

#: MambaConfig's defaults (FalconMambaConfig's: the same, plus ``mixer_rms_eps``)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50280, "hidden_size": 768, "state_size": 16, "num_hidden_layers": 32, "layer_norm_epsilon": 1e-5,
    "bos_token_id": 0, "eos_token_id": 0, "expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
    "hidden_act": "silu", "time_step_rank": "auto", "tie_word_embeddings": True, "mixer_rms_eps": 1e-6,
}
HF_ARCH = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM"}


@dataclass(frozen=True)
class Mamba1Spec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (``hidden_size``, vocabulary, norms; its attention fields unused) plus the mixer's."""

    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)
    inner: int = 0
    state: int = 0
    kernel: int = 0
    dt_rank: int = 0
    proj_bias: bool = False
    conv_bias: bool = True
    mixer_rms_eps: float | None = None  # Falcon-Mamba: B, C and dt normalized (weightless RMS norm)

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.inner, self.kernel, 1, self.inner, self.state)

    def to_hf_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "architectures": [HF_ARCH[self.architecture]], "model_type": self.architecture,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "state_size": self.state,
            "num_hidden_layers": self.n_layers, "layer_norm_epsilon": self.rms_eps,
            # (transformers takes a given intermediate_size over expand x hidden_size: an inner width that is no
            # multiple of the hidden size is written as it is)
            "expand": max(1, self.inner // self.hidden_size), "intermediate_size": self.inner,
            "conv_kernel": self.kernel, "use_bias": self.proj_bias, "hidden_act": hf_activation(self.activation),
            "use_conv_bias": self.conv_bias, "time_step_rank": self.dt_rank,
            "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "dtype": self.dtype,
        }
        if self.mixer_rms_eps is not None:
            cfg["mixer_rms_eps"] = self.mixer_rms_eps
        return cfg


def spec_from_config(arch: str, cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> Mamba1Spec:
    """The spec of a Mamba / Falcon-Mamba config (its keys over the config class' defaults)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)  # (its convolution's; the gate stays SiLU, as transformers runs it)
    hidden = cfg_int(cfg, "hidden_size", where)
    rank = cfg.get("time_step_rank")
    rank = -(-hidden // 16) if rank == "auto" else cfg_int({"time_step_rank": rank}, "time_step_rank", where)
    n = cfg_int(cfg, "num_hidden_layers", where)
    inner = cfg.get("intermediate_size") or cfg_int(cfg, "expand", where) * hidden
    return Mamba1Spec(
        architecture=arch, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden, intermediate_size=1,
        n_layers=n, n_heads=1, n_kv_heads=1, head_dim=64, rms_eps=cfg_num(cfg, "layer_norm_epsilon", where),
        max_position=1 << 20, tie_embeddings=bool(cfg["tie_word_embeddings"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        layer_types=("linear_attention",) * n, inner=int(inner), state=cfg_int(cfg, "state_size", where),
        kernel=cfg_int(cfg, "conv_kernel", where), dt_rank=rank, proj_bias=bool(cfg["use_bias"]),
        conv_bias=bool(cfg["use_conv_bias"]),
        mixer_rms_eps=cfg_num(cfg, "mixer_rms_eps", where) if arch == "falcon_mamba" else None,
    )


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Falcon-Mamba's weightless RMS norm (in fp32, back to the input's dtype)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class MambaMixer(nn.Module):
    """The selective-scan mixer (module docstring). ``norms``: ``falcon`` (weightless RMS norms of dt, B, C at
    ``eps``), ``jamba`` (RMS norms with weights: ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``) or none."""

    def __init__(self, hidden: int, inner: int, state: int, kernel: int, rank: int, *, proj_bias: bool,
                 conv_bias: bool, norms: str = "", eps: float = 1e-6, act: Activation | None = None) -> None:
        super().__init__()
        d, k = inner, kernel
        self.act: ConvAct = True if act is None else act  # (the convolution's: hidden_act)
        self.inner, self.state, self.kernel, self.rank = d, state, k, rank
        self.norms, self.eps = norms, eps
        self.conv1d = nn.Conv1d(d, d, k, groups=d, bias=conv_bias, padding=k - 1)
        self.in_proj = nn.Linear(hidden, 2 * d, bias=proj_bias)
        self.x_proj = nn.Linear(d, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, state))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, hidden, bias=proj_bias)
        if norms == "jamba":
            self.dt_layernorm = RMSNorm(rank, eps)
            self.b_layernorm = RMSNorm(state, eps)
            self.c_layernorm = RMSNorm(state, eps)

    def _selective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolved ``x [..., D]`` -> ``(dt before softplus [..., D], B, C [..., N])`` as transformers computes them."""
        step, b, c = self.x_proj(x).split((self.rank, self.state, self.state), dim=-1)
        if self.norms == "falcon":
            step, b, c = _rms(step, self.eps), _rms(b, self.eps), _rms(c, self.eps)
        elif self.norms == "jamba":
            step, b, c = self.dt_layernorm(step), self.b_layernorm(b), self.c_layernorm(c)
        return step @ self.dt_proj.weight.t(), b, c

    def forward(self, h: torch.Tensor, batch: Any, kv_layer: torch.Tensor) -> torch.Tensor:
        conv_pages, rec_pages = state_views(kv_layer, self.inner, self.kernel, 1, self.inner, self.state)
        xs, z = self.in_proj(h).chunk(2, dim=-1)
        a = -self.A_log.float().exp()
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        d = self.D.float()
        if batch.is_decode:  # (transformers' step: dt in the model's dtype)
            conv, s0, commit = decode_states(batch, conv_pages, rec_pages, xs, weight, bias, self.act)
            raw, b, c = self._selective(conv)
            dt = F.softplus(raw + self.dt_proj.bias.to(raw.dtype)).float()
            s1 = s0[:, 0] * (dt[:, :, None] * a).exp() + (dt[:, :, None] * b.float()[:, None, :]) * conv.float()[:, :, None]
            commit(s1[:, None])
            y = (s1.to(c.dtype) @ c[:, :, None])[:, :, 0] + conv * self.D
            out = (y * F.silu(z)).to(h.dtype)
        else:
            y = torch.empty(h.shape[0], self.inner, dtype=torch.float32, device=h.device)

            def run(conv: torch.Tensor, r0: int, r1: int, s: torch.Tensor) -> torch.Tensor:
                raw, b, c = self._selective(conv)
                dt = F.softplus(raw + self.dt_proj.bias.to(raw.dtype)).float()
                state = s[0]
                for t in range(conv.shape[0]):
                    state = (dt[t, :, None] * a).exp() * state + dt[t, :, None] * b[t].float()[None, :] * conv[t].float()[:, None]
                    y[r0 + t] = state.to(conv.dtype).float() @ c[t].float() + conv[t].float() * d
                return state[None]

            scan_sequences(batch, conv_pages, rec_pages, xs, weight, bias, run, self.act)
            out = (y * F.silu(z.float())).to(h.dtype)
        return cast(torch.Tensor, self.out_proj(out))


class Block(nn.Module):
    def __init__(self, spec: Mamba1Spec) -> None:
        super().__init__()
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mixer = MambaMixer(spec.hidden_size, spec.inner, spec.state, spec.kernel, spec.dt_rank,
                                proj_bias=spec.proj_bias, conv_bias=spec.conv_bias,
                                norms="falcon" if spec.mixer_rms_eps is not None else "",
                                eps=spec.mixer_rms_eps or 1e-6, act=activation_of(spec))



class Mamba1Model(HybridDecoder):
    """Mamba / Falcon-Mamba (module docstring) over state pages."""

    def __init__(self, spec: Mamba1Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec, lambda _: Block(spec)), device, backend)
        self.spec: Mamba1Spec = spec

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, block = self.begin_layer(layer, state, kv_layer)
        st.hidden = st.hidden + cast(MambaMixer, block.mixer)(block.norm(st.hidden), state.batch, kv_layer)
        state.next_layer += 1


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's ``backbone.*`` names as ours (Nemotron-H's renaming)."""
    from dualpath.model.nemotron_h import tensors_in as nemotron_in

    return nemotron_in(tensors, "checkpoint")
