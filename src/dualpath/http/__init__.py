"""The OpenAI-compatible HTTP API in front of a DualPath deployment (``dualpath serve --http``).

Importing this package is cheap; the ASGI app (:func:`dualpath.http.app.create_app`) pulls in FastAPI.
See docs/http.md.
"""

from __future__ import annotations

from dualpath.http.config import HttpConfig

__all__ = ["HttpConfig"]
