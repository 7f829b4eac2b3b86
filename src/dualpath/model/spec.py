"""The architecture of a Llama-family decoder, read from a Hugging Face ``config.json`` (or GGUF metadata).

Supported: ``LlamaForCausalLM`` (model_type ``llama``) and ``Qwen2ForCausalLM`` (``qwen2``): RMSNorm, RoPE
(``default``, ``linear``, ``llama3``, ``yarn``), grouped-query attention, SwiGLU MLP, optional q/k/v bias
(always on for Qwen2), optional tied embeddings. Anything else raises :class:`~dualpath.errors.ModelError`
naming the key at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "llama",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and hyper-parameters of one decoder. ``dtype`` is the compute and KV dtype name."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    weights_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in ("llama", "qwen2"):
            raise ModelError(f"unsupported architecture {self.architecture!r}; expected 'llama' or 'qwen2'")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ModelError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(
                f"model config: num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.dtype not in _DTYPES:
            raise ModelError(f"model dtype {self.dtype!r} unsupported; expected one of {sorted(_DTYPES)}")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ModelError(f"model config: rope_scaling type {rope_type!r} unsupported; expected {ROPE_TYPES}")
        if rope_type != "default" and "factor" not in (self.rope_scaling or {}):
            raise ModelError(f"model config: rope_scaling of type {rope_type!r} needs a 'factor'")
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if key not in (self.rope_scaling or {}):
                    raise ModelError(f"model config: llama3 rope_scaling is missing {key!r}")

    # ------------------------------------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return str(rs.get("rope_type", rs.get("type", "default")))

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def with_dtype(self, dtype: str) -> ModelSpec:
        return replace(self, dtype=dtype)

    def kv_spec(self) -> KVSpec:
        """The per-token per-layer KV layout: ``[2, n_kv_heads, head_dim]`` of ``dtype``."""
        return KVSpec.mha(self.n_layers, self.n_kv_heads, self.head_dim, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("weights_id")
        return d

    def fingerprint(self) -> str:
        """Stable hash of the architecture, dtype and weights identity: the namespace of block keys."""
        payload = json.dumps({"spec": self.to_dict(), "weights": self.weights_id}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers (and :meth:`from_hf_config`) read back to this spec."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.architecture]
        cfg: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.dtype,
        }
        if self.architecture == "llama":
            cfg["attention_bias"] = self.attention_bias
            cfg["mlp_bias"] = False
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            cfg["eos_token_id"] = self.eos_token_id
        return cfg

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, dtype: str | None = None) -> ModelSpec:
        """Read a Hugging Face config (a dict, a ``config.json`` path, or a directory holding one)."""
        where = "config"
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            try:
                config = json.loads(path.read_text())
            except FileNotFoundError:
                raise ModelError(f"model config {path} not found") from None
            except json.JSONDecodeError as exc:
                raise ModelError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(config, dict):
                raise ModelError(f"{path}: expected a JSON object")
        cfg: dict[str, Any] = config

        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        arch: str | None = None
        for a in archs:
            if a in ARCHITECTURES:
                arch = ARCHITECTURES[a]
                break
        if arch is None and model_type in ("llama", "qwen2", "mistral"):
            arch = "qwen2" if model_type == "qwen2" else "llama"
        if arch is None:
            raise ModelError(
                f"{where}: unsupported architecture {archs or model_type!r}; "
                f"supported: {sorted(ARCHITECTURES)} (model_type llama, qwen2)"
            )

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ModelError(f"{where}: missing required key {key!r}")
            return cfg[key]

        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ModelError(f"{where}: hidden_act {cfg['hidden_act']!r} unsupported (SwiGLU needs 'silu')")
        if cfg.get("mlp_bias"):
            raise ModelError(f"{where}: mlp_bias=true is unsupported")
        if cfg.get("use_sliding_window") or (arch == "llama" and cfg.get("sliding_window")):
            raise ModelError(f"{where}: sliding-window attention is unsupported")
        hidden = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or 0) or hidden // n_heads
        rope_params = cfg.get("rope_parameters")
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        if isinstance(rope_params, dict):  # transformers >= 5 writes rope_parameters
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if isinstance(rope_scaling, dict):
            rope_scaling = dict(rope_scaling)
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling.pop("type", None)
            rope_scaling["rope_type"] = kind
            if kind == "default":
                rope_scaling = None
            elif kind in ("llama3", "yarn"):
                rope_scaling.setdefault("original_max_position_embeddings",
                                        cfg.get("original_max_position_embeddings")
                                        or cfg.get("max_position_embeddings", 2048))
        elif rope_scaling is not None:
            raise ModelError(f"{where}: rope_scaling must be an object or null")
        if dtype is None:
            dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
            if dtype not in _DTYPES:
                dtype = "float32"
        default_bias = arch == "qwen2"
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", default_bias)) or default_bias,
            dtype=dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )


# --- rotary embeddings ------------------------------------------------------------------------------------------


def rope_inv_freq(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` (fp32) and the cos/sin scale for ``spec``'s RoPE variant."""
    dim = spec.head_dim
    base = spec.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = spec.rope_scaling or {}
    kind = spec.rope_type
    scale = 1.0
    if kind == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        low_wl, high_wl = old_ctx / low, old_ctx / high
        scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind == "yarn":
        factor = float(rs["factor"])
        orig = float(rs.get("original_max_position_embeddings", spec.max_position))
        beta_fast = float(rs.get("beta_fast") or 32)
        beta_slow = float(rs.get("beta_slow") or 1)

        def corr(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = corr(beta_fast), corr(beta_slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrap = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrap) + inv_freq * extrap
        attn = rs.get("attention_factor")
        if attn is None:
            ms, ms_all = rs.get("mscale"), rs.get("mscale_all_dim")

            def mscale(s: float, m: float = 1.0) -> float:
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

            attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
        scale = float(attn)
    return inv_freq.to(torch.float32), scale
