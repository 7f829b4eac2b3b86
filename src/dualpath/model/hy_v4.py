"""Hy4 (``HYV4ForCausalLM``, model_type ``hy_v4``), as transformers runs it, over the paged latent KV pool: GLM-5's
sparse MLA (:mod:`dualpath.model.deepseek`, :mod:`dualpath.model.dsa`) under DeepSeek-V4-style hyper-connections.

* **Attention**: DeepSeek-V3's MLA (RoPE over halves, not interleaved) with DeepSeek Sparse Attention: a lightning
  indexer on the ``full`` layers of ``indexer_types`` (by default layer 0 and every fourth from layer 1), whose
  ``shared`` layers reuse the last selection; the indexer rotates the **last** ``qk_rope_head_dim`` values of each
  head, its LayerNorm (at ``rms_norm_eps``) and head weights in fp32. Each head's output is scaled per channel by
  ``sigmoid(gate_proj(x))``, and each softmax has a learned **sink** logit per head in its denominator (so the
  attention runs on the torch reference, in the absorbed form; :func:`dualpath.kernels.reference.mla_masked_attention`).
* **Hyper-connections** (iHC): the residual is ``hc_mult`` streams (the embedding repeated). Before each sublayer,
  in fp32, ``mixes = fn(streams) * rsqrt(mean(streams^2) + eps)`` give ``pre = sigmoid(.) + hc_eps`` (the
  sublayer's input: the streams' weighted sum) and ``post = hc_magnitude sigmoid(.) + hc_eps`` (each stream adds
  ``post`` times the sublayer's output); no stream mixing. The head collapses the streams the same way
  (``hc_head``), then the final norm.
* **MoE** (``mlp_layer_types``: one dense layer, then sparse): DeepSeek-V3's sigmoid router with a correction bias,
  routed experts whose SwiGLU is clamped (``swiglu_limit``: the gate above, the up projection both ways), shared
  experts.

The pages are GLM-5's: a latent row per token and layer, the indexer key after it.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.deepseek import Backbone, DecoderLayer, DeepseekV3Model, MLAttention
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch
from dualpath.model.mla_spec import HY_TYPES, DeepseekV3Spec

__all__ = ["HyV4Model"]

#: parameters transformers keeps in fp32 in a bf16 model (``_keep_in_fp32_modules_strict``; the router's are fp32
#: here anyway)
_FP32 = ("attn_hc.", "ffn_hc.", "hc_head.", "self_attn.sinks", "indexer.weights_proj.", "indexer.k_norm.")


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    """One sublayer's hyper-connection: ``(post [N, hc], input [N, hidden])`` of the streams ``[N, hc, hidden]``."""

    def __init__(self, spec: DeepseekV3Spec) -> None:
        super().__init__()
        m = spec.hc_mult
        self.fn = nn.Parameter(torch.zeros(2 * m, m * spec.hidden_size))
        self.base = nn.Parameter(torch.zeros(2 * m))
        self.scale = nn.Parameter(torch.zeros(2))
        self.m, self.eps, self.norm_eps, self.magnitude = m, spec.hc_eps, spec.rms_eps, spec.hc_magnitude

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = h.flatten(1).float()
        mixes = F.linear(flat, self.fn.float()) * _inv_rms(flat, self.norm_eps)
        pre_b, post_b = self.base.float().split(self.m)
        pre_logits, post_logits = mixes.split(self.m, dim=-1)
        pre = torch.sigmoid(pre_logits * self.scale[0].float() + pre_b) + self.eps
        post = self.magnitude * torch.sigmoid(post_logits * self.scale[1].float() + post_b) + self.eps
        return post, (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)


class HyperHead(nn.Module):
    """The streams' final collapse before the norm and the head."""

    def __init__(self, spec: DeepseekV3Spec) -> None:
        super().__init__()
        m = spec.hc_mult
        self.hc_fn = nn.Parameter(torch.zeros(m, m * spec.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(m))
        self.hc_scale = nn.Parameter(torch.zeros(1))
        self.eps, self.norm_eps = spec.hc_eps, spec.rms_eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.flatten(1).float()
        mixes = F.linear(flat, self.hc_fn.float()) * _inv_rms(flat, self.norm_eps)
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)


class HyV4Model(DeepseekV3Model):
    """Hy4 (module docstring) over a paged latent KV pool."""

    def __init__(self, spec: DeepseekV3Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        if spec.model_type not in HY_TYPES:
            raise ModelError(f"HyV4Model runs {' / '.join(HY_TYPES)} specs, got {spec.model_type}")
        backbone = Backbone(spec)
        for layer in backbone.layers:
            layer.attn_hc = HyperConnection(spec)
            layer.ffn_hc = HyperConnection(spec)
        backbone.hc_head = HyperHead(spec)
        super().__init__(spec, device=device, backend=backend, backbone=backbone)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if any(k in name for k in _FP32):
                    p.data = p.data.float()

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        state = super().prefill_begin(batch)
        state.hidden = state.hidden.unsqueeze(1).expand(-1, self.spec.hc_mult, -1).contiguous()
        return state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        x = cast(RMSNorm, self.model.norm)(self.model.hc_head(h))
        return cast(torch.Tensor, self.lm_head(x).float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        self._check_kv(layer, kv_layer, state.batch.block_tokens)
        mod = cast(DecoderLayer, self.model.layers[layer])
        h = state.hidden
        dt = h.dtype
        post, x = cast(HyperConnection, mod.attn_hc)(h)
        out = self.attention(cast(MLAttention, mod.self_attn), mod.input_layernorm(x), state, kv_layer)
        h = (post.unsqueeze(-1) * out.float().unsqueeze(-2) + h.float()).to(dt)
        post, x = cast(HyperConnection, mod.ffn_hc)(h)
        out = mod.mlp(mod.post_attention_layernorm(x))
        state.hidden = (post.unsqueeze(-1) * out.float().unsqueeze(-2) + h.float()).to(dt)
        state.next_layer += 1


# --- tensors in and out --------------------------------------------------------------------------------------

#: the checkpoints' names (left) for ours (right), in transformers' order (its conversion mapping for hy_v4; its
#: save_pretrained writes the left ones, the MLPs' ``gate_proj`` included)
_HUB_NAMES = (
    (".hc_pre.hc_", ".hc_"), (".learnable_sink_param", ".sinks"), (".linear_gate", ".gate_proj"),
    (".hc_attn_layer.hc_fn", ".attn_hc.fn"), (".hc_attn_layer.hc_base", ".attn_hc.base"),
    (".hc_attn_layer.hc_scale", ".attn_hc.scale"), (".hc_mlp_layer.hc_fn", ".ffn_hc.fn"),
    (".hc_mlp_layer.hc_base", ".ffn_hc.base"), (".hc_mlp_layer.hc_scale", ".ffn_hc.scale"),
    (".hc_head_fn", ".hc_fn"), (".hc_head_base", ".hc_base"), (".hc_head_scale", ".hc_scale"),
)


def tensors_in(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's names (the released ones, as transformers' save_pretrained also writes them) as ours."""
    out = {}
    for name, t in tensors.items():
        for theirs, ours in _HUB_NAMES:
            name = name.replace(theirs, ours)
        out[name] = t
    return out


def tensors_out(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours as transformers' save_pretrained writes them: experts packed, the released names."""
    from dualpath.model.tensor_names import _packed_experts

    out = {}
    for name, t in _packed_experts(tensors).items():
        for theirs, ours in reversed(_HUB_NAMES[1:]):
            name = name.replace(ours, theirs)
        for part in (".hc_attn_layer.", ".hc_mlp_layer."):
            name = name.replace(part, ".hc_pre" + part)
        out[name.replace("model.hc_head.", "model.hc_pre.hc_head.")] = t
    return out
