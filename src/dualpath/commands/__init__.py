"""The CLI's subcommands (one module each: ``add_arguments(parser)`` and ``run(args)``), and what they share."""

from __future__ import annotations

import os

from dualpath.errors import ConfigError


def check_output_file(flag: str, out: str) -> None:
    """``out`` can be written as a file: its folder exists and it is not a folder itself (a :class:`ConfigError`
    naming ``flag`` otherwise). Checked before the work whose results it would hold, not after."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag}: directory {parent} does not exist")
    if os.path.isdir(out):
        raise ConfigError(f"{flag}: {out} is a directory; give a file name")
