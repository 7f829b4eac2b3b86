"""LangChain's ``ChatOpenAI`` (``langchain_openai``, a client nobody here wrote) against ``dualpath serve --http``.

Starts ``dualpath serve --http --inprocess`` with the embedded SmolLM2 and drives it the way LangChain apps do:
``invoke`` (usage with ``cache_read``), ``stream`` with ``stream_usage``, ``batch``, ``bind_tools`` with a named
``tool_choice`` (one call whose arguments parse), the legacy ``functions`` / ``function_call`` (answered as
``function_call``), ``with_structured_output`` by ``json_schema``,
``function_calling`` and ``json_mode`` (each parses into the pydantic model), ``logprobs``, ``stop``, ``n``, and the
Responses API (``use_responses_api``: text, stream, a forced tool call). Prints one line per check and exits 1 if
any failed. Whether the 135M model answers well is not checked, only that every answer has the shape asked for.

langchain_openai is not a dependency of dualpath: install it first (``pip install langchain_openai``).

    python3 benchmarks/langchain_check.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checks import Checks  # noqa: E402
from _inprocess_server import inprocess_server  # noqa: E402


def main() -> int:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    @tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        return "sunny"

    with inprocess_server(Path(tempfile.mkdtemp(prefix="langchain_"))) as url:
        import httpx

        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

        def llm(**kw: Any) -> Any:
            return ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model=model, max_retries=0, timeout=300,
                              **{"temperature": 0, "max_tokens": 96, **kw})

        check = Checks()


        check("invoke", lambda: llm().invoke([SystemMessage("Be brief."), HumanMessage("Say hello.")]),
              lambda r: bool(r.content) and r.usage_metadata["input_tokens"] > 0
              and "cache_read" in r.usage_metadata["input_token_details"])
        check("stream + usage", lambda: list(llm(max_tokens=8, stream_usage=True).stream("Count to five.")),
              lambda cs: len(cs) > 2 and any(c.usage_metadata and c.usage_metadata["output_tokens"] == 8 for c in cs))
        check("batch", lambda: llm(max_tokens=8).batch(["Say A.", "Say B."]), lambda rs: len(rs) == 2)
        check("bind_tools, named", lambda: llm().bind_tools([get_weather], tool_choice="get_weather")
              .invoke("Weather in Paris?"),
              lambda r: len(r.tool_calls) == 1 and r.tool_calls[0]["name"] == "get_weather"
              and isinstance(r.tool_calls[0]["args"].get("city"), str) and not r.content)
        weather_fn = {"name": "get_weather", "description": "Get the weather for a city.",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                     "required": ["city"]}}
        check("legacy functions, named", lambda: llm().bind(functions=[weather_fn],
              function_call={"name": "get_weather"}).invoke("Weather in Paris?"),
              lambda r: r.additional_kwargs["function_call"]["name"] == "get_weather"
              and isinstance(json.loads(r.additional_kwargs["function_call"]["arguments"]).get("city"), str)
              and r.response_metadata["finish_reason"] == "function_call")
        for method in ("json_schema", "function_calling", "json_mode"):
            check(f"with_structured_output({method})",
                  lambda m=method: llm().with_structured_output(Person, method=m).invoke(
                      "Make up a person. Reply in JSON with a name and an age."),
                  lambda p: isinstance(p, Person))
        check("logprobs", lambda: llm(max_tokens=4).bind(logprobs=True, top_logprobs=2).invoke("Hi"),
              lambda r: len(r.response_metadata["logprobs"]["content"]) == 4
              and len(r.response_metadata["logprobs"]["content"][0]["top_logprobs"]) == 2)
        check("stop", lambda: llm().bind(stop=["\n"]).invoke("List three fruits, one per line."),
              lambda r: "\n" not in r.content)
        check("n=2", lambda: llm(n=2, max_tokens=8, temperature=1.0).generate([[HumanMessage("Hi")]]),
              lambda r: len(r.generations[0]) == 2)
        check("Responses API", lambda: llm(use_responses_api=True, max_tokens=16).invoke("Say hi"),
              lambda r: bool(r.text))
        check("Responses API stream", lambda: list(llm(use_responses_api=True, max_tokens=8).stream("Say hi")),
              lambda cs: len(cs) > 2)
        check("Responses API, named tool", lambda: llm(use_responses_api=True).bind_tools(
              [get_weather], tool_choice="get_weather").invoke("Weather in Paris?"),
              lambda r: len(r.tool_calls) == 1 and r.tool_calls[0]["name"] == "get_weather")
    return check.exit_code()


if __name__ == "__main__":
    sys.exit(main())
