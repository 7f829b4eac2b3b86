"""The run's progress line: on a file or pipe, each count once (the last update's line is not written again at
close, unless a note follows); on a terminal, one line rewritten in place and ended at close."""

from __future__ import annotations

import io

from dualpath.runtime.runner import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(text: str) -> list[str]:
    return [" ".join(x.split()[:3]) for x in text.splitlines() if x.strip()]


def test_a_pipe_gets_each_final_count_once() -> None:
    out = io.StringIO()
    p = Progress("dualpath", 3, stream=out)
    p.start()
    for _ in range(3):
        p.update()
    p.close()
    lines = _lines(out.getvalue())
    assert lines[0] == "dualpath 0/3 turns" and lines.count("dualpath 3/3 turns") == 1 and lines[-1] == "dualpath 3/3 turns"
    out = io.StringIO()
    p = Progress("basic", 3, stream=out)
    p.start()
    p.update()
    p.close("stopped")  # a note: the line is written with it
    assert _lines(out.getvalue())[-1] == "basic 1/3 turns" and out.getvalue().rstrip().endswith("stopped")


def test_a_terminal_line_is_ended_at_close() -> None:
    out = _Tty()
    p = Progress("dualpath", 2, stream=out)
    p.start()
    p.update()
    p.update()
    p.close()
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1
