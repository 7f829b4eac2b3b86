"""Responses API ``truncation``, chat ``stream_options.continuous_usage_stats`` and which jobs ask for the
decode engine's "prompt stored" notice, through a real server and the official ``openai`` client. What the model says is scripted (:class:`ScriptedBackend` of ``test_http_tools``); the
prompts it was given are checked against the embedded tokenizer's own rendering of the kept messages."""

from __future__ import annotations

from typing import Any

import pytest
from test_http_tools import ScriptedBackend, _with_server

openai = pytest.importorskip("openai")

SYSTEM = {"role": "developer", "content": "Answer in one word."}
TURNS = [("Name a colour of the sky.", "Blue."), ("Name a colour of grass.", "Green."),
         ("Name a colour of snow.", "White."), ("And of the night?", None)]


def _items() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [SYSTEM]
    for q, a in TURNS:
        out.append({"role": "user", "content": q})
        if a is not None:
            out.append({"role": "assistant", "content": a})
    return out


def _render(tokenizer: Any, items: list[dict[str, Any]]) -> list[int]:
    msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in items]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


@pytest.mark.anyio
async def test_responses_truncation_auto_drops_the_oldest_turns_until_it_fits(tokenizer):
    items = _items()
    full = _render(tokenizer, items)
    keep_two = _render(tokenizer, [SYSTEM, *items[5:]])  # the last two turns (snow, night) and the system message
    keep_one = _render(tokenizer, [SYSTEM, *items[7:]])
    backend = ScriptedBackend(tokenizer, "Black.")
    out = 8
    backend.max_context = len(keep_two) + out  # the last two turns fit with the answer, three do not

    async def body(client: Any) -> None:
        with pytest.raises(openai.BadRequestError) as e:  # disabled (the default): a 400 naming the limit
            await client.responses.create(model="scripted", input=items, max_output_tokens=out)
        assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "max_output_tokens"
        r = await client.responses.create(model="scripted", input=items, max_output_tokens=out, truncation="auto")
        assert r.truncation == "auto" and r.output_text == "Black."
        assert backend.prompts[-1] == keep_two and r.usage.input_tokens == len(keep_two)
        # a tighter budget: only the last turn is kept; tighter still: even that does not fit (400)
        r = await client.responses.create(model="scripted", input=items, max_output_tokens=out + 1,
                                          truncation="auto")
        assert backend.prompts[-1] == keep_one
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model="scripted", input=items,
                                          max_output_tokens=backend.max_context - len(keep_one) + 1,
                                          truncation="auto")
        assert e.value.code == "context_length_exceeded"
        # a conversation that fits exactly is not cut
        r = await client.responses.create(model="scripted", input=[SYSTEM, *items[5:]], max_output_tokens=out,
                                          truncation="auto")
        assert backend.prompts[-1] == keep_two
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model="scripted", input="hi", max_output_tokens=2, truncation="middle")
        assert e.value.body["param"] == "truncation" and "'middle'" in e.value.message

    await _with_server(backend, body)
    assert len(full) > len(keep_two)  # (the whole conversation never reached the backend)
    assert full not in backend.prompts


@pytest.mark.anyio
async def test_continuous_usage_stats_give_every_chunk_its_usage_so_far(tokenizer):
    backend = ScriptedBackend(tokenizer, "The sky is blue today.")
    n_script = len(backend.script)

    async def body(client: Any) -> None:
        msgs = [{"role": "user", "content": "Colour of the sky?"}]
        n_prompt = len(_render(tokenizer, msgs))
        stream = await client.chat.completions.create(
            model="scripted", messages=msgs, max_tokens=50, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True})
        seen = [(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens, bool(c.choices))
                async for c in stream]
        assert all(u[0] == n_prompt and u[2] == u[0] + u[1] for u in seen)
        done = [u[1] for u in seen if u[3]]
        assert done == sorted(done) and done[0] == 0 and done[-1] == n_script  # role chunk first, then growing
        assert seen[-1][1] == n_script and not seen[-1][3]  # the usage chunk at the end, as without it
        stream = await client.chat.completions.create(  # without it: usage only on the last chunk
            model="scripted", messages=msgs, max_tokens=50, stream=True, stream_options={"include_usage": True})
        usages = [c.usage async for c in stream]
        assert all(u is None for u in usages[:-1]) and usages[-1].completion_tokens == n_script

    await _with_server(backend, body)


class _Recording(ScriptedBackend):
    """Records, per prompt, whether its job wanted the decode engine's "prompt stored" notice when it started."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        super().__init__(tokenizer, text)
        self.wanted: list[tuple[int, bool]] = []

    async def _generate(self, job: Any) -> Any:
        self.wanted.append((len(job.request.prompt_ids), job.wants_stored))
        return await super()._generate(job)


@pytest.mark.anyio
async def test_a_job_asks_for_the_stored_notice_only_when_someone_waits_for_it(tokenizer):
    """A deployment's decode engine sends its "prompt stored" notice only for a job that someone waits on: the
    first choice of a long prompt with more choices after it, or a request whose prefix others may share
    (registered as in flight); not a later choice, not a short prompt's choices."""
    from dualpath.http.config import HttpConfig

    backend = _Recording(tokenizer, "Fine.")
    long_prompt = [int(t) for t in tokenizer.encode("word " * 300)]

    async def body(client: Any) -> None:
        await client.completions.create(model="scripted", prompt=long_prompt, max_tokens=2, n=3)
        assert backend.wanted == [(len(long_prompt), True), (len(long_prompt), False), (len(long_prompt), False)]
        backend.wanted.clear()
        await client.completions.create(model="scripted", prompt=[5, 6, 7], max_tokens=2, n=2)
        assert backend.wanted == [(3, False), (3, False)]

    await _with_server(backend, body, HttpConfig(port=0, inflight_prefix_wait_s=0.0))
    backend.wanted.clear()

    async def single(client: Any) -> None:  # prefix sharing on: a long prompt registers as a lead
        await client.completions.create(model="scripted", prompt=long_prompt, max_tokens=2)
        await client.completions.create(model="scripted", prompt=[5, 6, 7], max_tokens=2)

    await _with_server(backend, single, HttpConfig(port=0))
    assert backend.wanted == [(len(long_prompt), True), (3, False)]
