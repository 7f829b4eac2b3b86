"""Compressed traces (gzip, bzip2, xz, a zip holding one file) load exactly as their plain files; a corrupt or
truncated stream, an ambiguous zip and a zstd file without its package are errors naming the file."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zipfile
from pathlib import Path
from typing import Any

import pytest

from dualpath.cli import main
from dualpath.errors import WorkloadError
from dualpath.workload.compressed import compression_of
from dualpath.workload.traces import load_trace

DATA = Path(__file__).parent.parent / "data"
AZURE = ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:50.1000000,1200,40\n"
         "2023-11-16 18:15:46.6805900,4808,10\n")
SHAREGPT = json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hello there"},
                                                      {"from": "gpt", "value": "hi, how can I help"}]}])


def _compress(kind: str, data: bytes, dst: Path) -> Path:
    if kind == "gzip":
        dst.write_bytes(gzip.compress(data))
    elif kind == "bzip2":
        dst.write_bytes(bz2.compress(data))
    elif kind == "xz":
        dst.write_bytes(lzma.compress(data))
    else:
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("folder/", b"")  # a folder entry is not a second file
            zf.writestr("folder/trace", data)
    return dst


def _shape(w: Any, lines: bool = True) -> list[tuple[Any, ...]]:
    return [(t.tid, t.arrival, [(u.append, u.gen, u.line if lines else None, u.append_ids, u.hash_ids)
                                for u in t.turns]) for t in w.trajectories]


@pytest.mark.parametrize(("kind", "name"), [
    *[(kind, name) for kind in ("gzip", "bzip2", "xz", "zip")
      for name in ("mooncake_small.jsonl", "trajectories_small.jsonl", "azure.csv")],
    ("gzip", "sharegpt.json"),  # one: conversations are tokenized, which takes a while
])
def test_compressed_trace_loads_as_its_plain_file(tmp_path: Path, kind: str, name: str) -> None:
    if name == "azure.csv":
        plain = tmp_path / name
        plain.write_text(AZURE)
    elif name == "sharegpt.json":
        plain = tmp_path / name
        plain.write_text(SHAREGPT)
    else:
        plain = DATA / name
    packed = _compress(kind, plain.read_bytes(), tmp_path / "trace.bin")  # no telling suffix: sniffed
    assert compression_of(packed.read_bytes()[:8]) == kind
    want, got = load_trace(plain), load_trace(packed)
    assert got.fmt == want.fmt and got.requests == want.requests > 0
    assert _shape(got) == _shape(want)


def test_trace_stats_reads_a_gzipped_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    packed = _compress("gzip", (DATA / "mooncake_small.jsonl").read_bytes(), tmp_path / "m.jsonl.gz")
    assert main(["trace", "stats", str(DATA / "mooncake_small.jsonl")]) == 0
    plain_out = capsys.readouterr().out
    assert main(["trace", "stats", str(packed)]) == 0
    out = capsys.readouterr().out
    assert out.replace(str(packed), "F") == plain_out.replace(str(DATA / "mooncake_small.jsonl"), "F")


def test_a_malformed_line_in_a_compressed_trace_names_the_decompressed_line(tmp_path: Path) -> None:
    lines = (DATA / "mooncake_small.jsonl").read_bytes().splitlines(keepends=True)
    lines.insert(2, b'{"timestamp": 5, "input_length": "many"}\n')
    packed = _compress("xz", b"".join(lines), tmp_path / "bad.jsonl.xz")
    with pytest.raises(WorkloadError, match=r"bad\.jsonl\.xz:3: .*input_length"):
        load_trace(packed, "mooncake")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_gzip_trace_is_an_error_not_a_partial_trace(tmp_path: Path, damage: str) -> None:
    data = gzip.compress((DATA / "mooncake_small.jsonl").read_bytes() * 50)
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
    p = tmp_path / "m.jsonl.gz"
    p.write_bytes(data)
    with pytest.raises(WorkloadError, match=r"m\.jsonl\.gz: .*gzip stream"):
        load_trace(p)


def test_a_zip_with_several_files_names_them(tmp_path: Path) -> None:
    p = tmp_path / "two.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("a.csv", AZURE)
        zf.writestr("b.csv", AZURE)
        zf.writestr("__MACOSX/._a.csv", b"\0")  # metadata: not counted
    with pytest.raises(WorkloadError, match=r"two\.zip: a zip archive with 2 files \(a\.csv, b\.csv\)"):
        load_trace(p)


def test_zstd_without_its_package_says_what_to_do(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl.zst"
    p.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 32)
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        with pytest.raises(WorkloadError, match=r"m\.jsonl\.zst: a zstd-compressed trace.*pip install zstandard"):
            load_trace(p)
    else:
        with pytest.raises(WorkloadError, match=r"m\.jsonl\.zst: .*zstd"):
            load_trace(p)  # 32 zero bytes are no zstd frame


def test_parquet_tables_load_as_their_text_files(tmp_path: Path) -> None:
    """A Parquet table (as datasets on the Hugging Face hub come): token-count columns read as the CSV trace,
    Mooncake rows (list-valued hash_ids) and ShareGPT conversations (list of structs) as their JSON lines."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from datetime import datetime

    # Azure's columns, the timestamps as a real timestamp column
    azure = tmp_path / "azure.csv"
    azure.write_text(AZURE)
    table = pa.table({"TIMESTAMP": [datetime(2023, 11, 16, 18, 15, 50, 100000),
                                    datetime(2023, 11, 16, 18, 15, 46, 680590)],
                      "ContextTokens": [1200, 4808], "GeneratedTokens": [40, 10]})
    pq.write_table(table, tmp_path / "azure.parquet")
    want, got = load_trace(azure), load_trace(tmp_path / "azure.parquet")
    assert got.fmt == "csv" and _shape(got) == _shape(want)
    # Mooncake rows, in small row groups (several batches)
    rows = [json.loads(line) for line in (DATA / "mooncake_small.jsonl").read_text().splitlines() if line.strip()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet", row_group_size=2)
    want, got = load_trace(DATA / "mooncake_small.jsonl"), load_trace(tmp_path / "m.parquet")
    assert got.fmt == "mooncake" and _shape(got, lines=False) == _shape(want, lines=False)  # (lines: rows here)
    # ShareGPT conversations
    pq.write_table(pa.Table.from_pylist(json.loads(SHAREGPT)), tmp_path / "s.parquet")
    got = load_trace(tmp_path / "s.parquet")
    assert got.fmt == "sharegpt" and _shape(got, lines=False) == _shape(load_trace(_sharegpt(tmp_path)), lines=False)
    # a bad cell names its row; a file that only starts like Parquet is an error naming it
    rows[1]["input_length"] = -5
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(WorkloadError, match=r"bad\.parquet:2: .*input_length"):
        load_trace(tmp_path / "bad.parquet")
    (tmp_path / "torn.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(WorkloadError, match=r"torn\.parquet: not a readable Parquet file"):
        load_trace(tmp_path / "torn.parquet")


def _sharegpt(tmp_path: Path) -> Path:
    p = tmp_path / "s.json"
    p.write_text(SHAREGPT)
    return p
