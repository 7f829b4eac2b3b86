"""docs/config.md's key reference is what the pydantic models say (every key, its type, default and text)."""

from __future__ import annotations

from pathlib import Path

from dualpath.config import DualPathConfig
from dualpath.configdoc import BEGIN, END, _section_union, main, reference, splice

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_the_page_holds_the_generated_reference() -> None:
    page = DOC.read_text(encoding="utf-8")
    assert BEGIN in page and END in page
    held = BEGIN + page.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    assert held == reference(), "docs/config.md is stale: run python -m dualpath.configdoc --write docs/config.md"


def test_every_key_of_every_section_and_backend_has_a_row_that_says_what_it_is() -> None:
    ref = reference()
    rows = {line.split("|")[1].strip().strip("`"): line for line in ref.splitlines() if line.startswith("| `")}
    for section in DualPathConfig.model_fields:
        models = _section_union(DualPathConfig, section) or [type(getattr(DualPathConfig(), section))]
        for model in models:  # (every backend of a section a kind chooses)
            for key in model.model_fields:
                if key != "kind":
                    assert f"{section}.{key}" in rows and f"`{section}.{key}`" in ref, f"{section}.{key}"
    assert {"storage.io_path", "transport.ucx_tls", "model.mla_prefill", "sim.gen_scale"} <= set(rows)
    assert len(rows) > 150
    blank = [k for k, line in rows.items() if line.rstrip().endswith("|  |")]
    assert blank == [], f"keys with no description: {blank}"
    # a few rows read as written: type with its bounds, default with its unit, the description
    assert rows["cluster.host_buffer_bytes"].startswith(
        "| `cluster.host_buffer_bytes` | int (> 0, <= 1,125,899,906,842,624) | `1073741824` (1 GiB) | ")
    assert "| 'none' \\| 'fsync' | `none` |" in rows["storage.durability"]
    assert "a config chosen by `kind` (memory, posix, kvikio, faults)" in rows["storage.inner"]
    assert "### `transport.kind: loopback` (the default)" in ref and "### `storage.kind: kvikio`" in ref


def test_write_refreshes_only_the_marked_block(tmp_path: Path) -> None:
    page = tmp_path / "config.md"
    page.write_text(f"# Config\n\nprose before\n\n{BEGIN}\nstale\n{END}\n\nprose after\n")
    assert main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Config\n\nprose before\n\n" + BEGIN) and text.endswith(END + "\n\nprose after\n")
    assert "stale" not in text and text == splice(text, reference())
    assert main(["--bogus"]) == 2
