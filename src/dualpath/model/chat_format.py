"""A chat template's content format: does it read a message's ``content`` as a string or as content parts?

Most chat templates print ``message['content']``. Many image-text checkpoints' templates (Idefics 3, SmolVLM,
LLaVA-OneVision, ...) instead loop over it as OpenAI content parts
(``{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}``). Given a string,
such a template prints nothing for it, so the user's text is dropped with no error. The format is found once per
template by rendering a probe message both ways: vLLM makes the same "content format" decision by reading the
template's source, and here the template's own behaviour decides. :func:`template_messages` then hands the
template string contents as one text part where it reads parts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

ContentFormat = Literal["string", "parts"]

#: text no template writes on its own: whether it shows up in the rendering says whether the content was read
_PROBE = "dualpath-content-probe-7f3a"
#: where a tokenizer keeps its template's format: (the template it was found for, the format)
_CACHE_ATTR = "_dualpath_content_format"


def content_format(tok: Any) -> ContentFormat:
    """``"parts"`` when ``tok``'s chat template prints a user message's text only when the content is a list of
    text parts, else ``"string"`` (also for a template that reads both, or refuses a lone user message)."""
    template = getattr(tok, "chat_template", None)
    cached = getattr(tok, _CACHE_ATTR, None)
    if isinstance(cached, tuple) and cached[0] == template:
        return cached[1]  # type: ignore[no-any-return]
    fmt: ContentFormat = "string"
    if template and not _shows_probe(tok, _PROBE) and _shows_probe(tok, [{"type": "text", "text": _PROBE}]):
        fmt = "parts"
    with contextlib.suppress(AttributeError, TypeError):  # (a tokenizer that takes no new attribute: found again)
        setattr(tok, _CACHE_ATTR, (template, fmt))
    return fmt


def _shows_probe(tok: Any, content: Any) -> bool:
    try:
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)
    except Exception:  # (the template's own checks: it does not render this message)
        return False
    return _PROBE in str(text)


def template_messages(tok: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as ``tok``'s chat template reads them: unchanged for a string template; for a parts template,
    each string content as one text part (an empty one as no part)."""
    if content_format(tok) == "string":
        return messages
    out = []
    for m in messages:
        c = m.get("content")
        out.append({**m, "content": [{"type": "text", "text": c}] if c else []} if isinstance(c, str) else m)
    return out
