"""Opening a trace file as it was published: plain, or compressed.

Public traces often ship compressed (``.jsonl.gz``, ``.csv.xz``, a ``.zip`` holding one CSV). Every trace reader
opens its file through :func:`open_trace`, which tells the compression from the file's first bytes (not its
name) and streams the decompressed bytes, so line numbers in errors count lines of the decompressed text:

* gzip (``1f 8b``), bzip2 (``BZh``) and xz (``fd 37 7a 58 5a 00``): Python's own modules;
* zip (``PK 03 04``): the archive must hold exactly one file (its other entries are folders or macOS ``__MACOSX``
  metadata), which is read;
* zstd (``28 b5 2f fd``): through the ``zstandard`` package when it is installed, else an error saying so;
* Parquet (``PAR1``, the format of datasets on the Hugging Face hub; through ``pyarrow``, the ``parquet``
  extra): read in record batches and handed on as text the readers know. A table with an input-token and an
  output-token column and no nested columns becomes CSV (:mod:`dualpath.workload.csvtrace`); any other table
  becomes JSON lines, one object per row (Mooncake / Qwen-Bailian fields, ShareGPT ``conversations`` or chat
  ``messages`` columns, our ``turns``). Line numbers in errors count rows (CSV: from 2, after the header).

A truncated or corrupt stream is a :class:`WorkloadError` naming the file, never a partial trace served as if it
were whole.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zipfile
import zlib
from typing import IO, Any

from dualpath.errors import WorkloadError

_GZIP = b"\x1f\x8b"
_BZIP2 = b"BZh"
_XZ = b"\xfd7zXZ\x00"
_ZIP = b"PK\x03\x04"
_ZSTD = b"\x28\xb5\x2f\xfd"
_PARQUET = b"PAR1"
#: what a stream that cannot be decompressed raises, by module
_CODEC_ERRORS: tuple[type[BaseException], ...] = (EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile,
                                                  gzip.BadGzipFile, OSError)


def compression_of(head: bytes) -> str | None:
    """``gzip``, ``bzip2``, ``xz``, ``zip``, ``zstd`` or ``parquet`` from a file's first bytes; None for anything
    else."""
    for magic, name in ((_GZIP, "gzip"), (_BZIP2, "bzip2"), (_XZ, "xz"), (_ZIP, "zip"), (_ZSTD, "zstd"),
                        (_PARQUET, "parquet")):
        if head.startswith(magic):
            return name
    return None


class _Checked(io.RawIOBase):
    """A decompressing stream whose codec errors become :class:`WorkloadError` naming the file."""

    def __init__(self, inner: Any, path: str, codec: str, closers: list[Any],
                 errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self._inner = inner
        self._errors = errors
        self._path = path
        self._codec = codec
        self._closers = closers

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._inner.read(len(b))
        except self._errors as e:
            detail = str(e) or type(e).__name__
            raise WorkloadError(f"corrupt or truncated {self._codec} stream ({detail})", path=self._path) from None
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            for f in (self._inner, *self._closers):
                f.close()
        super().close()


class _Chunks:
    """``read(n)`` over the byte chunks :meth:`_next` produces (``b""`` once there are no more)."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def _next(self) -> bytes:
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        while self._pos >= len(self._buf):
            self._buf, self._pos = self._next(), 0
            if not self._buf:
                return b""
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def close(self) -> None:
        self._buf, self._pos = b"", 0


class _ZstdFrames(_Chunks):
    """The decompressed bytes of every zstd frame in ``raw``; a stream that ends inside a frame raises
    :class:`EOFError` (``zstandard``'s own stream reader returns what it has then, and a partial trace would pass
    for a whole one)."""

    def __init__(self, zstandard: Any, raw: IO[bytes]) -> None:
        super().__init__()
        self._dctx = zstandard.ZstdDecompressor()
        self._raw = raw
        self._frame: Any = None

    def _next(self) -> bytes:
        out = b""
        while not out:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a frame")
                return b""
            while chunk:  # a frame may end inside the chunk: the next one starts with what is left
                if self._frame is None or self._frame.eof:
                    self._frame = self._dctx.decompressobj()
                out += self._frame.decompress(chunk)
                chunk = self._frame.unused_data if self._frame.eof else b""
        return out


class _ParquetText(_Chunks):
    """The rows of a Parquet file as CSV or JSON-lines bytes (see the module docstring), batch by batch."""

    def __init__(self, raw: IO[bytes], path: str) -> None:
        super().__init__()
        try:
            import pyarrow.parquet as pq  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            raise WorkloadError("a Parquet trace, and the 'pyarrow' package is not installed: pip install "
                                "'dualpath[parquet]' (or pyarrow), or export the table to JSON lines or CSV",
                                path=path) from None
        import pyarrow as pa  # type: ignore[import-not-found, unused-ignore]

        from dualpath.workload.csvtrace import INPUT_COLUMNS, OUTPUT_COLUMNS, _pick

        try:
            self._file = pq.ParquetFile(raw)
        except (pa.ArrowException, OSError) as e:
            raise WorkloadError(f"not a readable Parquet file ({e})", path=path) from None
        schema = self._file.schema_arrow
        names = list(schema.names)
        flat = not any(pa.types.is_nested(f.type) for f in schema)
        # a flat table of token counts reads as CSV, unless its columns are Mooncake rows as AIPerf writes them (a
        # think time or a text input per row: their sessions are per-turn inputs, not CSV conversations)
        aiperf = any(n in names for n in ("delay", "text_input", "messages"))
        self._csv = flat and not aiperf and _pick(names, INPUT_COLUMNS) is not None \
            and _pick(names, OUTPUT_COLUMNS) is not None
        self._batches = self._file.iter_batches(batch_size=4096)
        self._header = self._csv_lines([names]) if self._csv else b""

    @staticmethod
    def _csv_lines(rows: list[list[Any]]) -> bytes:
        import csv

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(["" if v is None else v for v in row] for row in rows)
        return buf.getvalue().encode()

    def _next(self) -> bytes:
        import json

        if self._header:
            out, self._header = self._header, b""
            return out
        for batch in self._batches:  # (an empty batch gives no bytes, which would read as the end: skipped)
            if batch.num_rows == 0:
                continue
            if self._csv:
                cols = [c.to_pylist() for c in batch.columns]
                return self._csv_lines([list(r) for r in zip(*cols, strict=True)])
            return "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n"
                           for row in batch.to_pylist()).encode()
        return b""


def _zip_member(zf: zipfile.ZipFile, p: str) -> zipfile.ZipInfo:
    files = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
    if len(files) != 1:
        names = ", ".join(i.filename for i in files[:5]) + (" ..." if len(files) > 5 else "")
        raise WorkloadError(f"a zip archive with {len(files)} files ({names or 'none'}); expected exactly one "
                            "trace file in it: unpack it and pass the file", path=p)
    return files[0]


def open_trace(path: str | os.PathLike[str]) -> IO[bytes]:
    """The bytes of the trace at ``path``, decompressed when it is compressed (see the module docstring), as a
    buffered binary file to iterate by line or read. A file that cannot be opened is a :class:`WorkloadError`."""
    p = str(path)
    try:
        raw = open(p, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except OSError as e:
        raise WorkloadError(f"cannot open trace: {e.strerror}", path=p) from e
    try:
        codec = compression_of(raw.peek(8)[:8])
        if codec is None:
            return raw
        closers: list[Any] = [raw]
        errors = _CODEC_ERRORS
        inner: Any  # GzipFile, BZ2File, LZMAFile, ZipExtFile or a zstd reader: each has read() and close()
        if codec == "gzip":
            inner = gzip.GzipFile(fileobj=raw, mode="rb")
        elif codec == "bzip2":
            inner = bz2.BZ2File(raw, mode="rb")
        elif codec == "xz":
            inner = lzma.LZMAFile(raw, mode="rb")  # noqa: SIM115 - closed with the returned stream
        elif codec == "zip":
            try:
                zf = zipfile.ZipFile(raw)
            except (zipfile.BadZipFile, OSError) as e:
                raise WorkloadError(f"corrupt zip archive ({e})", path=p) from None
            member = _zip_member(zf, p)
            closers.insert(0, zf)
            inner = zf.open(member)
        elif codec == "parquet":
            inner = _ParquetText(raw, p)
            import pyarrow as pa  # type: ignore[import-not-found, unused-ignore]

            errors = (*errors, pa.ArrowException)
        else:
            try:
                import zstandard  # type: ignore[import-not-found, unused-ignore]
            except ImportError:
                raise WorkloadError("a zstd-compressed trace, and the 'zstandard' package is not installed: "
                                    "pip install zstandard, or decompress it (zstd -d FILE)", path=p) from None
            inner = _ZstdFrames(zstandard, raw)
            errors = (*errors, zstandard.ZstdError)
        return io.BufferedReader(_Checked(inner, p, codec, closers, errors), buffer_size=1 << 16)
    except BaseException:
        raw.close()
        raise


def read_trace_text(path: str | os.PathLike[str]) -> str:
    """The whole trace at ``path`` as text, decompressed, a leading UTF-8 byte-order mark dropped; bytes that are
    not UTF-8 are a :class:`WorkloadError` naming the line."""
    p = str(path)
    with open_trace(p) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WorkloadError("not UTF-8 text", path=p, line=data.count(b"\n", 0, e.start) + 1) from None
    return text.lstrip("\ufeff")


def parse_json(text: str, p: str, line: int | None = None) -> Any:
    """``json.loads(text)``; malformed or too deeply nested JSON is a :class:`WorkloadError` naming the file and the
    line (``line`` for one line of JSON lines, else the error's own line in ``text``)."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"not valid JSON ({e.msg})", path=p, line=e.lineno if line is None else line) from None
    except RecursionError:
        raise WorkloadError("JSON nested too deeply", path=p, line=line) from None
