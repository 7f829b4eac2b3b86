"""A hybrid model (Qwen3-Next: Gated DeltaNet layers whose recurrent state lives in state pages) served as processes:
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
if not hasattr(transformers, "Qwen3NextForCausalLM"):
    pytest.skip("no Qwen3-Next in this transformers", allow_module_level=True)


def _checkpoint(d: Path) -> Path:
    cfg = transformers.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, max_position_embeddings=4096,
        layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if not n.endswith(("A_log", "dt_bias")):
                p.mul_(4.0)
    hf.save_pretrained(d)
    return d


@pytest.mark.slow
def test_hybrid_model_served_as_processes_gives_the_in_process_tokens(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "model")
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
