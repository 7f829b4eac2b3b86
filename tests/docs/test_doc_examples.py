"""Every ``python`` code block of docs/library.md and README.md runs, as written, so the examples cannot rot.

A block preceded by ``<!-- requires: N cuda -->`` needs N CUDA devices and is skipped without them. Blocks run
in a fresh namespace each, in a temporary working directory, with no ``DUALPATH_*`` variables and one torch
thread. ``bash`` blocks are not run here (the README's commands are the CI script itself).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "library.md", ROOT / "README.md"]
_FENCE = re.compile(r"(?:<!--\s*requires:\s*(\d+)\s*cuda\s*-->\s*\n)?```python\n(.*?)```", re.S)


def code_blocks(path: Path) -> list[tuple[int, int, str]]:
    """(line of the block, CUDA devices required, code) for each ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start(2)) + 1
        out.append((line, int(m.group(1) or 0), m.group(2)))
    return out


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


BLOCKS = [pytest.param(p, line, gpus, code, id=f"{p.name}:{line}") for p in DOCS
          for line, gpus, code in code_blocks(p)]


def test_the_docs_have_examples() -> None:
    assert len(code_blocks(DOCS[0])) >= 8
    assert any(gpus == 2 for _, gpus, _ in code_blocks(DOCS[0])), "the two-GPU example must be marked"
    assert code_blocks(DOCS[1]), "README.md has no python example"


@pytest.mark.slow
@pytest.mark.parametrize(("path", "line", "gpus", "code"), BLOCKS)
def test_example_runs(path: Path, line: int, gpus: int, code: str, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    if gpus and _cuda_devices() < gpus:
        pytest.skip(f"needs {gpus} CUDA devices")
    for name in list(os.environ):
        if name.startswith("DUALPATH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, f"{path.name}:{line}", "exec")
    exec(compiled, {"__name__": f"docs_example_{line}"})
