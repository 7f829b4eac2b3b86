"""A hybrid model (Qwen3-Next: Gated DeltaNet layers whose recurrent state lives in state pages; Kimi Linear: KDA
layers beside MLA, their states in widened latent rows) served as processes:
`dualpath serve` starts a scheduler, a PE and a DE process over zmq and posix storage; a client replays a multi-turn
trace; every turn's tokens equal the in-process cluster's, and later turns hit the KV (and state) the DE persisted,
so the state crossed processes whole: PE -> DE over the transport, DE -> storage -> PE."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dualpath.config import DualPathConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

from serve_util import (  # noqa: E402
    VOCAB,
    reference_tokens,
    replay,
    stats,
    stop_process,
    survivors,
    tiny_config,
    tokens_of,
    trace,
)

transformers = pytest.importorskip("transformers")


def _checkpoint(d: Path, family: str) -> Path:
    if family == "kimi_linear":
        cfg = transformers.KimiLinearConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, num_experts=4, num_experts_per_token=2, linear_num_heads=2, linear_head_dim=8,
            model_max_length=4096, layer_types=["linear_attention", "full_attention"], pad_token_id=None)
        return _save(cfg, transformers.KimiLinearForCausalLM, d)
    cfg = transformers.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, max_position_embeddings=4096,
        layer_types=["linear_attention", "full_attention"])
    return _save(cfg, transformers.Qwen3NextForCausalLM, d)


def _save(cfg: object, model_cls: type, d: Path) -> Path:
    torch.manual_seed(0)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if not n.endswith(("A_log", "dt_bias")):
                p.mul_(4.0)
    hf.save_pretrained(d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_next", "kimi_linear"])
def test_hybrid_model_served_as_processes_gives_the_in_process_tokens(tmp_path: Path, family: str) -> None:
    if not hasattr(transformers, {"qwen3_next": "Qwen3NextConfig", "kimi_linear": "KimiLinearConfig"}[family]):
        pytest.skip(f"no {family} in this transformers")
    model = _checkpoint(tmp_path / "model", family)
    data = tiny_config(tmp_path / "kv").model_dump(mode="python")
    data["model"] = {"kind": "llama", "path": str(model), "dtype": "float32", "time_model": "off"}
    cfg = DualPathConfig.model_validate(data)
    cfg_file = tmp_path / "serve.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    work = tmp_path / "work"
    log = open(tmp_path / "serve.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "dualpath.cli", "serve", "--config", str(cfg_file),
                             "--workdir", str(work)], stdout=log, stderr=subprocess.STDOUT)
    pids: list[int] = []
    try:
        address = None
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and proc.poll() is None:
            if (work / "scheduler.addr").exists():
                address = (work / "scheduler.addr").read_text().strip()
                try:
                    st = stats(address, cfg)
                except Exception:
                    st = {}
                if st.get("engines_alive", 0) >= 2:
                    pids = [int(st["pe0.pid"]), int(st["de0.pid"])]
                    break
            time.sleep(0.2)
        assert address and pids, f"serve did not come up: {(tmp_path / 'serve.out').read_text()[-3000:]}"
        agents = trace(n_agents=2, n_turns=3)
        ref = reference_tokens(cfg, agents)
        res = replay(address, agents, cfg)
        assert len(res.records) == 6
        assert tokens_of(res) == ref
        assert all(r.outcome.hit_tokens > 0 for r in res.records if r.turn > 0)
    finally:
        stop_process(proc, signal.SIGINT)
        log.close()
        assert not survivors(pids), "engine processes outlived `dualpath serve`"
