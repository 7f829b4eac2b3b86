"""The ``demo`` preset, the embedded default of ``dualpath run``: an I/O-bound emulated 1P1D cluster any CPU
machine can run (``dualpath.load_config(preset="demo")``; :data:`DEMO_CONFIG`).

What makes it I/O-bound like the paper's setting (numbers in :data:`DEFAULT_CONFIG`):

* **storage NICs are slow**: ``snic_gbps`` (per node) is chosen so that reading the hit KV of the whole trace
  through one node takes most of a minute, far more than anything else;
* **compute is cheap**: the synthetic model's FLOPs and ``device_tflops`` make prefill of the miss tokens a few
  per cent of the run, and a decode step a few milliseconds;
* **compute NICs are wide**: ``cnic_gbps`` is 8x the storage NIC (the paper's node has 8 CNICs of B for one SNIC
  of s*B with s = 1), so the extra hop of the DE read path is never the bottleneck.

With the PE read path alone only the prefill node's storage NIC reads; DualPath reads through both, so the
speed-up is bounded by (P + D) / P = 2. The workload is the built-in agentic trace
(:data:`dualpath.runtime.workload.BUILTIN_SPEC`: multi-turn sessions of a few thousand tokens, short
generations): every turn after the first hits its whole previous context, as in the paper's traces. Storage is POSIX files (real reads and
writes, checksummed) in a fresh directory per policy under ``/dev/shm`` where it exists; the transport is
in-process.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dualpath.config import ConfigSource, DualPathConfig

#: the ``demo`` preset: the embedded default of ``dualpath run`` (merged under a ``--config`` file and
#: ``DUALPATH_*`` variables). ``dualpath.load_config(preset="demo")`` gives it; ``load_config()`` alone gives the
#: library defaults (memory storage, 8-layer synthetic model, 1 GB/s storage NICs), built for unit-sized runs.
DEFAULT_CONFIG: dict[str, Any] = {
    "storage": {"kind": "posix", "root": "<temp>", "durability": "none", "io_threads": 4},
    "transport": {"kind": "loopback"},
    "model": {
        "kind": "synthetic",
        "n_layers": 4,
        "n_kv_heads": 1,
        "head_dim": 32,
        "kv_dtype": "bfloat16",
        "linear_flops_per_token": 2.0e9,
        "device_tflops": 100.0,
        "decode_step_s": 0.04,
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
    "workload": {"dataset": "agentic-cpu", "n_agents": 24, "mode": "offline", "seed": 0},
}

#: the same dict under the name it has in :func:`dualpath.load_config` (``preset="demo"``)
DEMO_CONFIG = DEFAULT_CONFIG

#: policies ``dualpath run`` compares when none is named
DEFAULT_POLICIES = ["pe_only", "dualpath"]


def default_storage_root() -> str:
    """Where the default run keeps its block files: a RAM-backed ``/dev/shm`` when there is one (creating and
    removing thousands of small files on a loaded disk costs seconds that are not the experiment), else the
    system's temporary directory. Each policy gets a fresh subdirectory, removed afterwards."""
    import os
    import tempfile

    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "dualpath-run")


def default_config_dict() -> dict[str, Any]:
    """A deep copy of :data:`DEFAULT_CONFIG` (the storage root resolved for this machine)."""
    d = copy.deepcopy(DEFAULT_CONFIG)
    d["storage"]["root"] = default_storage_root()
    return d


def load_run_config(config: ConfigSource = None) -> DualPathConfig:
    """The configuration of ``dualpath run``: the ``demo`` preset < ``config`` < ``DUALPATH_*`` variables.

    ``config``: a file path (YAML/TOML/JSON; only the keys it changes), a mapping of sections (merged the same
    way), or a complete :class:`DualPathConfig`, used as it is (the environment is not applied to it). This is
    ``dualpath.load_config(config, preset="demo")``; ``dualpath.load_config()`` alone gives the library defaults.
    """
    from dualpath.config import DualPathConfig, load_config

    if isinstance(config, DualPathConfig):
        return config.model_copy(deep=True)
    return load_config(config, preset="demo")
