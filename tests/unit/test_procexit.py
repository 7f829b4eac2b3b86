"""``dualpath.procexit``: a process that skips the final collection still shuts down as usual: ``atexit`` handlers
(and ``weakref.finalize`` callbacks) run, and a buffered file held by a module global is flushed and closed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import atexit, gc, sys, weakref
    from pathlib import Path
    from dualpath.procexit import skip_final_collection

    out = Path(sys.argv[1])
    held = open(out / "buffered.txt", "w")  # never closed by the script: a module global
    held.write("x" * 100_000)

    class Box:
        pass

    box = Box()
    weakref.finalize(box, lambda: (out / "finalized.txt").write_text("yes"))
    atexit.register(lambda: (out / "atexit.txt").write_text(str(gc.get_freeze_count() > 0)))
    skip_final_collection()
""")


def test_the_shutdown_still_runs_atexit_finalizers_and_flushes_files(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "atexit.txt").read_text() == "True"  # (the objects were frozen when it ran)
    assert (tmp_path / "finalized.txt").read_text() == "yes"
    assert (tmp_path / "buffered.txt").read_text() == "x" * 100_000


def test_the_command_line_entry_point_is_the_one_that_skips_it() -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'dualpath = "dualpath.cli:console"' in pyproject.splitlines()
    for argv, code in ((["trace", "stats", "/nonexistent"], 2), (["--version"], 0)):  # (--version: SystemExit)
        r = subprocess.run([sys.executable, "-c", "import sys, gc\nfrom dualpath.cli import console\n"
                            f"sys.argv = ['dualpath', *{argv!r}]\ntry:\n    code = console()\n"
                            "except SystemExit as e:\n    code = e.code or 0\nprint(code, gc.get_freeze_count() > 0)"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip().splitlines()[-1] == f"{code} True", (argv, r.stdout, r.stderr)
