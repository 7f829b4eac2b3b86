"""Request bodies whose strings are not valid Unicode: a lone UTF-16 surrogate, which JSON can spell
(``"\\ud800"``) and Python's ``json`` decodes into a ``str`` that cannot be encoded (a tokenizer, a log line or a
response then fails). Such a body gets a 400 naming the field, before it is validated or served.

The check costs nothing on ordinary bodies: only one whose bytes hold a surrogate escape (``\\uD800`` to
``\\uDFFF``, either case) is parsed again and walked, and a valid pair is one astral character once decoded, so
only lone halves are refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(body: bytes) -> str | None:
    """The dotted path (``messages.0.content``; a key itself: the path to it plus the key) of the first string in
    the JSON ``body`` holding a lone surrogate, or None (also for a body that is not JSON: validation says so)."""
    if not _ESCAPE.search(body):
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _walk(obj, [])


def _walk(obj: Any, path: list[str]) -> str | None:
    if isinstance(obj, str):
        return ".".join(path) if _LONE.search(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if _LONE.search(k):
                return ".".join([*path, k.encode("utf-8", "backslashreplace").decode()])
            found = _walk(v, [*path, k])
            if found is not None:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _walk(v, [*path, str(i)])
            if found is not None:
                return found
    return None

