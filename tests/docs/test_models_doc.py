"""``docs/models.md`` names every architecture the loader reads, and every test file it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_architecture_is_in_the_checkpoints_page():
    from dualpath.model.hf_config import _IMAGE_TEXT_ARCHS
    from dualpath.model.spec import _DEEPSEEK_ARCH, ARCHITECTURES

    text = (ROOT / "docs" / "models.md").read_text()
    missing = [a for a in (*ARCHITECTURES, *_DEEPSEEK_ARCH, *_IMAGE_TEXT_ARCHS) if f"`{a}`" not in text]
    assert not missing, f"docs/models.md does not name {missing}"
    for name in re.findall(r"`(test_[a-z0-9_*]+\.py)`", text):
        assert list((ROOT / "tests" / "model").glob(name)), f"docs/models.md cites {name}, which is not in tests/model"
