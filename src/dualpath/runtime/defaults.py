"""The embedded default of ``dualpath run``: an I/O-bound emulated 1P1D cluster any CPU machine can run.

What makes it I/O-bound like the paper's setting (numbers in :data:`DEFAULT_CONFIG`):

* **storage NICs are slow**: ``snic_gbps`` (per node) is chosen so that reading the hit KV of the whole trace
  through one node takes most of a minute, far more than anything else;
* **compute is cheap**: the synthetic model's FLOPs and ``device_tflops`` make prefill of the miss tokens a few
  per cent of the run, and a decode step a few milliseconds;
* **compute NICs are wide**: ``cnic_gbps`` is 8x the storage NIC (the paper's node has 8 CNICs of B for one SNIC
  of s*B with s = 1), so the extra hop of the DE read path is never the bottleneck.

With the PE read path alone only the prefill node's storage NIC reads; DualPath reads through both, so the
speed-up is bounded by (P + D) / P = 2. The workload is the built-in "small" agentic generator (multi-turn
sessions of a few thousand tokens, short generations): every turn after the first hits its whole previous
context, as in the paper's traces. Storage is POSIX files in a fresh temporary directory per policy (real
reads and writes, checksummed), the transport in-process.
"""

from __future__ import annotations

import copy
from typing import Any

#: the embedded default configuration (merged under a ``--config`` file and ``DUALPATH_*`` variables)
DEFAULT_CONFIG: dict[str, Any] = {
    "storage": {"kind": "posix", "root": "/tmp/dualpath-run", "durability": "none", "io_threads": 4},
    "transport": {"kind": "loopback"},
    "model": {
        "kind": "synthetic",
        "n_layers": 4,
        "n_kv_heads": 1,
        "head_dim": 32,
        "kv_dtype": "bfloat16",
        "linear_flops_per_token": 2.0e9,
        "device_tflops": 100.0,
        "decode_step_s": 0.002,
        "max_context": 16384,
        "vocab_size": 4096,
    },
    "cluster": {
        "prefill_nodes": 1,
        "decode_nodes": 1,
        "engines_per_node": 1,
        "devices": "cpu",
        "block_tokens": 64,
        "snic_gbps": 0.01,
        "cnic_gbps": 0.08,
        "host_buffer_bytes": 256 << 20,
        "kv_pool_tokens": 262144,
    },
    "scheduler": {"policy": "dualpath"},
    "workload": {"dataset": "small", "n_agents": 32, "mode": "offline", "seed": 0},
}

#: workload scale applied to the built-in generator (lengths x scale)
DEFAULT_SCALE = 2.0

#: policies ``dualpath run`` compares when none is named
DEFAULT_POLICIES = ["pe_only", "dualpath"]


def default_config_dict() -> dict[str, Any]:
    """A deep copy of :data:`DEFAULT_CONFIG`."""
    return copy.deepcopy(DEFAULT_CONFIG)
