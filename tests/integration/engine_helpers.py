"""Shared helpers of the engine/cluster/paths integration tests (not a test module)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dualpath.cluster import Cluster
from dualpath.config import DualPathConfig
from dualpath.model.config import LlamaModelConfig, SyntheticModelConfig

BT = 16
HF_BASE = {"vocab_size": 211, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0}

# turns of one session: (appended tokens, tokens to generate)
SESSION = [(37, 6), (20, 5), (29, 4)]


def hf_llama(directory: Path, seed: int = 0) -> Any:
    """A tiny random Hugging Face Llama saved to ``directory`` (norm weights perturbed so they matter)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_BASE)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def llama_config(model_dir: Path, **cluster: Any) -> DualPathConfig:
    cfg = DualPathConfig()
    cfg.model = LlamaModelConfig(path=str(model_dir), dtype="float32")
    _cluster_defaults(cfg, cluster)
    return cfg


def synthetic_config(n_layers: int = 4, **cluster: Any) -> DualPathConfig:
    cfg = DualPathConfig()
    cfg.model = SyntheticModelConfig(n_layers=n_layers, n_kv_heads=2, head_dim=64, kv_dtype="bfloat16",
                                     device_tflops=1e4, decode_step_s=0.0, max_context=4096, vocab_size=1000)
    _cluster_defaults(cfg, cluster)
    return cfg


def _cluster_defaults(cfg: DualPathConfig, cluster: dict[str, Any]) -> None:
    c = cfg.cluster
    c.block_tokens = BT
    c.snic_gbps = None
    c.cnic_gbps = None
    c.host_buffer_bytes = 32 << 20
    c.kv_pool_tokens = 2048
    c.deadline_s = 10.0
    c.prefill_max_batch_tokens = 1024
    c.devices = os.environ.get("DUALPATH_TEST_DEVICES", "cpu")  # "auto" on a GPU machine
    for k, v in cluster.items():
        setattr(c, k, v)


def session_prompts(seed: int = 1, vocab: int = 211) -> list[list[int]]:
    """The appended token chunks of :data:`SESSION` (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n, _ in SESSION]


async def run_session(cluster: Cluster, path: str, *, pe: int = 0, de: int = 0, pe_blocks: int | None = None,
                      session: str = "s", vocab: int = 211) -> list[Any]:
    """Run :data:`SESSION` (client resends the whole context each turn); returns the TurnResults."""
    context: list[int] = []
    results = []
    for (_, gen), chunk in zip(SESSION, session_prompts(vocab=vocab), strict=True):
        prompt = context + chunk
        res = await cluster.run_turn(session, prompt, gen, pe=pe, de=de, path=path, pe_blocks=pe_blocks)
        results.append(res)
        context = prompt + res.token_ids
    return results
