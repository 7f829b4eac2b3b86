"""Scheduler core: pure decisions over engine snapshots (no I/O, no clock).

``GlobalScheduler`` (core) assigns PE, DE and read side per fetch round; ``prefill`` is the paper's Algorithm 1,
``decode`` the two-level DE scheme, ``path`` the read-side choice and split, ``batching`` the PE forward-batch
packer, ``policies`` the named policies of the ablation.
"""

from dualpath.scheduler.batching import (
    ComputeProfile,
    PendingPrefill,
    advance,
    attention_time,
    pack_forward_batch,
)
from dualpath.scheduler.core import GlobalScheduler
from dualpath.scheduler.decode import assign_decode
from dualpath.scheduler.params import SchedulerParams
from dualpath.scheduler.path import choose_read_side, split_blocks
from dualpath.scheduler.policies import ABLATION_LADDER, POLICIES, Policy, get_policy
from dualpath.scheduler.prefill import assign_prefill
from dualpath.scheduler.state import Assignment, Chunk, EngineLoad, EngineSnapshot, ForwardBatch, RequestInfo

__all__ = [
    "ABLATION_LADDER",
    "POLICIES",
    "Assignment",
    "Chunk",
    "ComputeProfile",
    "EngineLoad",
    "EngineSnapshot",
    "ForwardBatch",
    "GlobalScheduler",
    "PendingPrefill",
    "Policy",
    "RequestInfo",
    "SchedulerParams",
    "advance",
    "assign_decode",
    "assign_prefill",
    "attention_time",
    "choose_read_side",
    "get_policy",
    "pack_forward_batch",
    "split_blocks",
]
