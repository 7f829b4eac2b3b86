"""The half-precision warning: which CPUs compute bfloat16 / float16 natively, and the one-time log at load."""

from __future__ import annotations

import logging

import pytest

from dualpath.model import cpu_precision as cp

AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})


@pytest.mark.parametrize(("dtype", "flags", "machine", "want"), [
    ("bfloat16", AVX2, "x86_64", True),
    ("bfloat16", AVX2 | {"avx512f", "avx512_bf16"}, "x86_64", False),
    ("bfloat16", AVX2 | {"amx_bf16", "amx_tile"}, "x86_64", False),
    ("bfloat16", AVX2 | {"avx512_fp16"}, "x86_64", True),  # float16's flag does not make bfloat16 native
    ("float16", AVX2, "AMD64", True),
    ("float16", AVX2 | {"avx512_fp16"}, "x86_64", False),
    ("float16", AVX2 | {"amx_fp16"}, "x86_64", False),
    ("float32", AVX2, "x86_64", False),
    ("bfloat16", AVX2, "aarch64", False),  # not judged off x86
])
def test_which_cpus_emulate_which_dtype(dtype, flags, machine, want) -> None:  # type: ignore[no-untyped-def]
    assert cp.emulated(dtype, flags, machine) is want


def test_unreadable_flags_say_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cp, "cpu_flags", lambda path="/proc/cpuinfo": None)
    assert not cp.emulated("bfloat16", None, "x86_64")
    monkeypatch.setattr(cp, "cpu_flags", lambda path="/proc/cpuinfo": AVX2)
    assert cp.emulated("bfloat16", None, "x86_64")


def test_flags_are_read_from_cpuinfo(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: none\n"
                 "processor\t: 1\nflags\t\t: fpu\n")
    assert cp.cpu_flags(str(f)) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cp.cpu_flags(str(tmp_path / "missing")) is None
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert cp.cpu_flags(str(tmp_path / "noflags")) is None


def test_the_warning_is_logged_once_per_dtype_on_the_cpu_only(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cp, "_warned", set())
    monkeypatch.setattr(cp, "emulated", lambda dtype: dtype in ("bfloat16", "float16"))
    with caplog.at_level(logging.WARNING, logger="dualpath.model"):
        assert not cp.warn_if_emulated("bfloat16", "cuda")
        assert not cp.warn_if_emulated("float32", "cpu")
        assert cp.warn_if_emulated("bfloat16", "cpu")
        assert not cp.warn_if_emulated("bfloat16", "cpu")
        assert cp.warn_if_emulated("float16", "cpu")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert "model.dtype bfloat16 on a CPU without AVX512-BF16 or AMX-BF16" in msgs[0]
    assert "model.dtype float16 on a CPU without AVX512-FP16 or AMX-FP16" in msgs[1]
    assert "float32" in msgs[0]


def test_load_model_in_bfloat16_warns_exactly_where_this_cpu_emulates_it(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    from dualpath.model.loader import load_model

    monkeypatch.setattr(cp, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="dualpath.model"):
        load_model({"dtype": "bfloat16"}, with_tokenizer=False)
        load_model({"dtype": "float32"}, with_tokenizer=False)
    got = [r for r in caplog.records if "torch emulates its matmuls" in r.getMessage()]
    assert len(got) == (1 if cp.emulated("bfloat16") else 0)
