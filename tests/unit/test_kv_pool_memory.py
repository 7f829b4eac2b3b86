"""The KV pool's memory: zeros, of the spec's dtype and shape, that cost nothing until used (calloc'd pages)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dualpath.model.kv_pool import zeros_untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_zeros_untouched_is_torch_zeros(dtype):
    shape = (3, 5, 4, 2, 2, 8)
    t = zeros_untouched(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros(shape, dtype=dtype))
    t[1, 2].fill_(3)  # writable, and a write lands where a torch.zeros tensor's would
    ref = torch.zeros(shape, dtype=dtype)
    ref[1, 2].fill_(3)
    assert torch.equal(t, ref)
    assert zeros_untouched((0, 4), dtype).shape == (0, 4)


def test_a_large_pool_is_not_resident_until_used():
    """2 GiB of zeros leave the process's peak resident memory far below 2 GiB (torch.zeros would write them all)."""
    code = ("import resource, torch;"
            "from dualpath.model.kv_pool import zeros_untouched;"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "t = zeros_untouched((2, 1024, 1024, 256), torch.float32);"
            "t[0, :16].fill_(1.0);"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.strip())
    assert grew < 256 << 20, f"peak resident memory grew by {grew / 2**20:.0f} MiB for 16 MiB written"
