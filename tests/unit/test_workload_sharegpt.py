"""Conversation datasets (ShareGPT, chat messages) as traces: one session per conversation, a turn per reply,
token counts from a real tokenizer, format detection, and errors that name the file and the conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualpath.errors import WorkloadError
from dualpath.workload.csvtrace import detect_format
from dualpath.workload.sharegpt import load_conversations
from dualpath.workload.traces import load_trace

SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "system", "value": "You are helpful."},
        {"from": "human", "value": "What is the capital of France? Please answer briefly."},
        {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And of Germany?"},
        {"from": "gpt", "value": "Berlin is the capital of Germany."},
        {"from": "human", "value": "thanks"},  # no reply after it: not a turn
    ]},
    {"id": "b", "conversations": [{"from": "human", "value": "hello?"}]},  # no reply at all: no session
    {"id": "c", "conversations": [{"from": "human", "value": "Write a haiku."},
                                  {"from": "gpt", "value": "Autumn moonlight, a worm digs silently."}]},
]


def words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def n_words(text: str) -> int:
    return len(text.split())


def test_a_conversation_is_a_session_and_each_reply_ends_a_turn(tmp_path: Path) -> None:
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps(SHAREGPT, indent=2))  # pretty-printed: the first line is "["
    assert detect_format(p) == "sharegpt"
    conv = load_conversations(p, words)
    assert (conv.no_reply, conv.trailing) == (1, 1)
    a, c = conv.trajectories
    assert [(t.append, t.gen) for t in a.turns] == [
        (n_words("You are helpful.\nWhat is the capital of France? Please answer briefly."), n_words("Paris.")),
        (n_words("And of Germany?"), n_words("Berlin is the capital of Germany.")),
    ]
    assert [(t.append, t.gen) for t in c.turns] == [(3, 6)]
    # turn 2's prompt is the whole conversation before its reply, as a chat client sends it
    assert a.prompt_len(1) == a.turns[0].append + a.turns[0].gen + a.turns[1].append


def test_chat_messages_as_jsonl_with_content_parts(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "one two"}, {"type": "text",
                                                                                        "text": "three"}]},
                      {"role": "assistant", "content": "four five"},
                      {"role": "tool", "content": "six"},
                      {"role": "assistant", "content": None}]},
        {"conversation": [{"role": "USER", "content": "x"}, {"role": "Assistant", "content": "y z"}]},
    ]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_format(p) == "sharegpt"
    conv = load_conversations(p, words)
    assert [[(t.append, t.gen) for t in s.turns] for s in conv.trajectories] == [[(3, 2), (1, 1)], [(1, 2)]]


def test_agent_trajectories_are_sessions_whose_tool_calls_are_replies(tmp_path: Path) -> None:
    """SWE-agent trajectories (role ``ai``, ``text``) and OpenHands ones (OpenAI messages: assistant ``tool_calls``,
    ``tool`` observations), under a ``trajectory`` key: each model step ends a turn and the observations after it
    are the next turn's new input."""
    call = [{"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{\"cmd\": \"ls\"}"}}]
    rows = [
        {"instance_id": "swe-1", "trajectory": [
            {"role": "system", "text": "you fix bugs", "mask": False, "system_prompt": None},
            {"role": "user", "text": "issue: it crashes", "mask": False},
            {"role": "ai", "text": "let me look", "mask": True},
            {"role": "user", "text": "file a b c", "mask": False},
            {"role": "ai", "text": "done", "mask": True}]},
        {"instance_id": "oh-1", "trajectory": [
            {"role": "system", "content": "agent", "tool_calls": None, "tool_call_id": None, "name": None},
            {"role": "user", "content": "fix it", "tool_calls": None, "tool_call_id": None, "name": None},
            {"role": "assistant", "content": None, "tool_calls": call, "tool_call_id": None, "name": None},
            {"role": "tool", "content": "x.py y.py", "tool_calls": None, "tool_call_id": "c1", "name": "bash"},
            {"role": "assistant", "content": "fixed", "tool_calls": None, "tool_call_id": None, "name": None}]},
    ]
    p = tmp_path / "agents.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert detect_format(p) == "sharegpt"
    swe, oh = load_conversations(p, words).trajectories
    assert [(t.append, t.gen) for t in swe.turns] == [(3 + 3, 3), (4, 1)]
    # the tool call's JSON is the first reply's tokens; the observation is the next turn's input
    assert [(t.append, t.gen) for t in oh.turns] == [(1 + 2, n_words(json.dumps(call))), (2, 1)]
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    # as published on the hub: a Parquet table, here with the trajectory stored as JSON text
    table = pa.table({"instance_id": ["swe-1"], "trajectory": [json.dumps(rows[0]["trajectory"])]})
    pq.write_table(table, tmp_path / "agents.parquet")
    got = load_conversations(tmp_path / "agents.parquet", words).trajectories
    assert [[(t.append, t.gen) for t in s.turns] for s in got] == [[(t.append, t.gen) for t in swe.turns]]


def test_token_counts_are_the_tokenizers(tmp_path: Path) -> None:
    """The default counter is the embedded SmolLM2 tokenizer: the counts equal transformers' own."""
    transformers = pytest.importorskip("transformers")
    from dualpath.model.embedded import embedded_model_path

    tok = transformers.AutoTokenizer.from_pretrained(str(embedded_model_path()))
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps(SHAREGPT))
    (a, c) = load_conversations(p).trajectories

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    assert (a.turns[0].append, a.turns[0].gen) == (
        n("You are helpful.\nWhat is the capital of France? Please answer briefly."), n("Paris."))
    assert (c.turns[0].append, c.turns[0].gen) == (n("Write a haiku."),
                                                    n("Autumn moonlight, a worm digs silently."))


def test_load_trace_serves_it_and_says_what_was_left(tmp_path: Path) -> None:
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps(SHAREGPT))
    w = load_trace(p)
    assert w.fmt == "sharegpt" and w.requests_in_file == 3 and w.sessions_in_file == 2
    assert "1 conversation without a reply skipped" in w.note and "1 conversation ends with messages no reply" in w.note
    # named explicitly, through the config a run is built from (as `dualpath run --trace-format sharegpt`)
    from dualpath.workload import WorkloadConfig, build_workload

    trajs = build_workload(WorkloadConfig(trace=str(p), trace_format="sharegpt"))
    assert len(trajs) == 2 and [len(t.turns) for t in trajs] == [2, 1]


def test_bounds_tokenize_only_the_conversations_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_requests`` / ``max_agents`` keep the file's first conversations (it has no times); only those are
    tokenized (most of the cost on a dataset of 90K conversations), and the note still counts the whole file."""
    import dualpath.workload.sharegpt as sg

    convs = [{"id": str(k), "conversations": [
        {"from": "human", "value": f"question {k} " * (k + 1)}, {"from": "gpt", "value": "answer " * (k + 2)},
        {"from": "human", "value": "more"}, {"from": "gpt", "value": f"reply {k}"}]} for k in range(40)]
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps(convs[:3] + [{"id": "x", "conversations": [{"from": "human", "value": "?"}]}] + convs[3:]))
    counted: list[int] = []

    def counter() -> object:
        def count(texts: list[str]) -> list[int]:
            counted.append(len(texts))
            return words(texts)
        return count

    monkeypatch.setattr(sg, "default_counter", counter)
    whole = load_trace(p)
    assert counted == [160] and whole.requests == 80 and whole.sessions_in_file == 40
    for kw, kept_convs, turns in (({"max_requests": 5}, 3, [2, 2, 1]), ({"max_requests": 6}, 3, [2, 2, 2]),
                                  ({"max_agents": 4}, 4, [2, 2, 2, 2]),
                                  ({"max_agents": 4, "max_requests": 3}, 4, [2, 1])):
        counted.clear()
        w = load_trace(p, **kw)
        assert counted == [4 * kept_convs], kw  # two texts per turn, of the kept conversations only
        assert [len(t.turns) for t in w.trajectories] == turns, kw
        assert [(u.append, u.gen) for t in w.trajectories for u in t.turns] == \
            [(u.append, u.gen) for t in whole.trajectories[:len(turns)] for u in t.turns][:sum(turns)], kw
        assert w.requests_in_file == 80 and w.sessions_in_file == 40, kw
        assert w.note.startswith(f"{sum(turns)} of 80 requests ("), (kw, w.note)
        assert "1 conversation without a reply skipped" in w.note, kw
    assert "first 5 requests" in load_trace(p, max_requests=5).note
    assert "first 4 of 40 sessions" in load_trace(p, max_agents=4).note


@pytest.mark.parametrize(("body", "where"), [
    ([{"id": 1, "conversations": [{"value": "hi"}]}], "item #0, message 0: missing the speaker"),
    ([{"id": 1, "conversations": [{"from": "human", "value": {"a": 1}}]}], "item #0, message 0: message content"),
    ([{"id": 1}, {"id": 2, "conversations": []}], "item #0: no message list"),
    ([[1, 2]], "item #0: expected a conversation object"),
])
def test_bad_conversations_name_the_item_and_message(tmp_path: Path, body: object, where: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(body))
    with pytest.raises(WorkloadError, match=where) as e:
        load_trace(p, "sharegpt")
    assert str(p) in str(e.value)


def test_broken_files_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "trunc.json"
    p.write_text('[\n  {"conversations": [\n    {"from": "human", "value": "hi"},\n')
    with pytest.raises(WorkloadError, match=rf"{p}:\d+: not valid JSON"):
        load_trace(p)
    q = tmp_path / "latin1.jsonl"
    q.write_bytes(b'{"messages": [{"role": "user", "content": "ok"}]}\n{"messages": [{"role": "user", '
                  b'"content": "caf\xe9"}]}\n')
    with pytest.raises(WorkloadError, match=rf"{q}:2: not UTF-8"):
        load_trace(q)


def test_requests_with_a_reply_length_end_in_a_turn_that_asks_for_it(tmp_path: Path) -> None:
    """OpenAI request bodies logged one per line: the messages end with the user's, and ``max_tokens`` (or
    another reply-length key) says how long the reply is. The trailing messages are then one more turn, of that
    length; without such a key they are left out, as before."""
    rows = [
        {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b c"}],
         "max_tokens": 30},
        {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two three"},
                      {"role": "user", "content": "four five"}], "max_completion_tokens": 12},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "max_tokens": 99},  # ends with its reply: the reply's own length counts, not the cap
        {"messages": [{"role": "user", "content": "no length"}]},  # neither a reply nor a length: no session
    ]
    p = tmp_path / "requests.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_format(p) == "sharegpt"
    conv = load_conversations(p, words)
    assert (conv.no_reply, conv.trailing) == (1, 0)
    assert [[(t.append, t.gen) for t in s.turns] for s in conv.trajectories] == [
        [(n_words("be brief\na b c"), 30)],
        [(1, 2), (2, 12)],
        [(1, 1)],
    ]
    w = load_trace(p)
    assert w.sessions_in_file == 3 and "1 conversation without a reply skipped" in w.note


def test_prompt_datasets_are_one_turn_sessions(tmp_path: Path) -> None:
    """``{"prompt": ...}`` lines (vLLM's custom dataset and the like): one turn each, its reply the reply text
    (``completion`` / ``response`` / ``output`` / ``answer``) or a reply-length key; a prompt list is messages."""
    rows = [
        {"prompt": "write a poem about the sea", "output_len": 7},
        {"prompt": "summarize this", "completion": "it is short"},
        {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi there"}],
         "response": "hello"},
        {"prompt": "no reply given"},
    ]
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_format(p) == "sharegpt"
    conv = load_conversations(p, words)
    assert conv.no_reply == 1
    assert [[(t.append, t.gen) for t in s.turns] for s in conv.trajectories] == [[(6, 7)], [(2, 3)], [(3, 1)]]
    assert [len(t.turns) for t in load_trace(p).trajectories] == [1, 1, 1]


@pytest.mark.parametrize("bad", [0, -3, "30", True, 2.5])
def test_a_bad_reply_length_is_refused_naming_the_line_and_key(tmp_path: Path, bad: object) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": bad}) + "\n")
    with pytest.raises(WorkloadError, match=r"line 2: max_tokens must be a positive integer") as e:
        load_trace(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("jsonl", [False, True], ids=["array", "jsonl"])
def test_a_session_too_long_for_the_engines_is_named_as_the_file_names_it(tmp_path: Path, jsonl: bool) -> None:
    """``check_fits`` names the conversation as the file does (``item #2`` of an array, or its line, and its id),
    not by its index among the sessions kept (a conversation without a reply is skipped, so they differ)."""
    from dualpath.workload.traces import check_fits

    long = " ".join(["word"] * 300)
    items = [{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
             {"id": "no-reply", "conversations": [{"from": "human", "value": "anyone?"}]},
             {"id": "big", "conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "ok"}]}]
    p = tmp_path / ("d.jsonl" if jsonl else "d.json")
    p.write_text("\n".join(json.dumps(i) for i in items) + "\n" if jsonl else json.dumps(items))
    w = load_trace(p, "sharegpt")
    with pytest.raises(WorkloadError) as e:
        check_fits(w, 100, "a DE's KV memory")
    msg = str(e.value)
    assert (f"{p}:3: session (id 'big') turn 0" if jsonl else "item #2 (id 'big') turn 0") in msg, msg
    assert "session 1" not in msg
