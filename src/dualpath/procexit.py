"""The end of a dualpath process: its interpreter's shutdown without the final garbage collection.

A process that imported torch holds millions of objects; the cyclic collection Python runs over all of them at
shutdown costs 0.4-0.8 s of CPU per process on a 2-core box (measured: ``import torch`` then exit, 0.45-0.61 s
after the last line; 0.12 s with :func:`skip_final_collection`). A deployment's stop pays it once per process, a
test suite once per command it runs. The shutdown is otherwise the usual one: ``atexit`` handlers (and so
``weakref.finalize`` callbacks) run, module globals are released and the objects they held are freed (files
flushed and closed); only garbage already caught in reference cycles is left to the operating system.

Called by each ``__main__`` entry point just before it returns, never by library code: a researcher's process that
calls :func:`dualpath.cli.main` keeps its collector as it was.
"""

from __future__ import annotations

import gc
from typing import NoReturn


def skip_final_collection() -> None:
    """Move every object tracked so far out of the collector's reach (``gc.freeze``): the interpreter's shutdown
    then skips the cyclic collection over them. Call it only as the process is about to exit."""
    gc.freeze()


def exit_with(code: int | None) -> NoReturn:
    """A ``__main__``'s last line: :func:`skip_final_collection`, then ``SystemExit(code)``."""
    skip_final_collection()
    raise SystemExit(code)
