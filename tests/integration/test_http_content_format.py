"""Chat templates that read a message's content as parts (Idefics 3, SmolVLM, LLaVA-OneVision: ``{% for line in
message['content'] %}{% if line['type'] == 'text' %}``) get the request's text as text parts, through a real server
and the official ``openai`` client; given a string, such a template prints nothing of it, and the user's words
would be dropped without an error. Templates that print ``message['content']`` keep getting strings."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_http_tools import ScriptedBackend, _with_server

from dualpath.model.chat_format import content_format, template_messages

openai = pytest.importorskip("openai")

#: the shape of Idefics 3's / SmolVLM's template: content parts only
PARTS_TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
                  "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                  "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:{% endif %}")
#: the shape of LLaVA-OneVision's: parts filtered by type
SELECT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                   "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: reads both (Gemma 3's and Mistral 3's do)
BOTH_TEMPLATE = ("{% for message in messages %}[{{ message['role'] }}] {% if message['content'] is string %}"
                 "{{ message['content'] }}{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}"
                 "{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def _with_template(tokenizer: Any, template: str) -> Any:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_the_format_is_read_from_the_templates_behaviour(tokenizer):
    """Parts-only templates are ``parts``; templates that print the content, or read both, are ``string``; the
    embedded SmolLM2's own template is ``string``; a changed template is looked at again."""
    assert content_format(tokenizer) == "string"
    assert template_messages(tokenizer, [{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    for template, want in ((PARTS_TEMPLATE, "parts"), (SELECT_TEMPLATE, "parts"), (BOTH_TEMPLATE, "string")):
        tok = _with_template(tokenizer, template)
        assert content_format(tok) == want, template
    tok = _with_template(tokenizer, PARTS_TEMPLATE)
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "", "tool_calls": []}]
    assert template_messages(tok, msgs) == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]},
                                            {"role": "assistant", "content": [], "tool_calls": []}]
    tok.chat_template = BOTH_TEMPLATE
    assert content_format(tok) == "string"


@pytest.mark.anyio
@pytest.mark.parametrize("template", [PARTS_TEMPLATE, SELECT_TEMPLATE], ids=["idefics3", "llava_onevision"])
async def test_a_parts_template_gets_the_users_text(tokenizer, template):
    """A chat (with a system message and an earlier turn) through such a template: every message's text is in the
    prompt the engine receives, in order."""
    tok = _with_template(tokenizer, template)
    backend = ScriptedBackend(tok, "Fine.")

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", max_tokens=20, messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}])
        assert r.choices[0].message.content == "Fine."

    await _with_server(backend, body)
    prompt = tok.decode(backend.prompts[0])
    words = ["Be brief.", "What is the capital of France?", "Paris.", "And of Italy?"]
    at = [prompt.find(w) for w in words]
    assert all(i >= 0 for i in at) and at == sorted(at), prompt
