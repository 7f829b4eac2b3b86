"""create_storage: kinds, lazy imports, the kvikio reason on a machine without a GPU, the bench command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dualpath.errors import StorageError
from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.storage import create_storage
from dualpath.storage.config import KvikioStorageConfig, MemoryStorageConfig

LAYOUT = KVLayout(KVSpec.mha(n_layers=2, n_kv_heads=1, head_dim=8, dtype="float16"), block_tokens=8)
NS = KeyNamespace.for_layout("factory", LAYOUT)


def test_importing_storage_loads_no_backend():
    code = (
        "import sys, dualpath.storage, dualpath.storage.config;"
        "print([m for m in ('dualpath.storage.posix', 'dualpath.storage.kvikio', 'kvikio') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_kind_is_a_clear_error():
    class Bogus:
        kind = "tape"

    with pytest.raises(StorageError, match="unknown storage backend 'tape'"):
        create_storage(Bogus(), LAYOUT, NS)


def test_memory_kind():
    assert create_storage(MemoryStorageConfig(), LAYOUT, NS).kind == "memory"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_kvikio_without_gpu_says_why(tmp_path):
    with pytest.raises(StorageError, match="kvikio needs a CUDA GPU"):
        create_storage(KvikioStorageConfig(root=tmp_path), LAYOUT, NS)


@pytest.mark.slow
def test_bench_storage_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "dualpath.cli", "bench", "storage", "--quick", "--blocks", "8", "--batch", "4",
           "--repeats", "1", "--json", str(out), "--root", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    data = json.loads(out.read_text())
    assert data["ratio"] > 0 and 0 <= data["checksum_overhead"] <= 1
    assert 0 < data["verify_ceiling"] <= 1
    for c in data["cases"].values():
        assert c["checksum_overhead_floor"] == pytest.approx(1 - c["verify_ceiling"], abs=2e-3)
        assert c["read_ratio_vs_ceiling"] == pytest.approx(c["read_ratio_warm"] / c["verify_ceiling"], rel=0.02)
        # the decomposition: (raw + hash) / raw times posix verified / (raw + hash) is posix verified / raw
        assert c["raw_verified_ratio"] * c["read_ratio_vs_raw_verified"] == pytest.approx(c["read_ratio_warm"],
                                                                                           rel=0.02)
    assert data["raw_verified_ratio"] == min(c["raw_verified_ratio"] for c in data["cases"].values())
    methods = {(r["case"], r["op"], r["method"]) for r in data["runs"]}
    for case in ("smollm2-135m", "deepseek-v32-mla-fp8"):
        for op, m in [("write", "posix"), ("read_warm", "posix_verify"), ("read_warm", "posix_noverify"),
                      ("read_warm", "raw_preadv"), ("read_warm", "raw_preadv_xxh3")]:
            assert (case, op, m) in methods
    assert all(r["gib_s"] > 0 for r in data["runs"])
    assert {r["block_bytes"] for r in data["runs"]} == {30 * 64 * 768, 61 * 64 * 656}
