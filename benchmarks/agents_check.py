"""Agent frameworks nobody here wrote against ``dualpath serve --http``: the OpenAI Agents SDK (``openai-agents``)
and Pydantic AI, each through both of OpenAI's APIs (Chat Completions and Responses).

Starts ``dualpath serve --http --inprocess`` with the embedded SmolLM2 and runs, per framework and API:

* a one-turn agent (text, usage);
* the same conversation continued (the framework resends the history: the server must report the reused prefix as
  cached tokens, which is DualPath's whole point for agents);
* a forced tool call (``tool_choice`` required), the tool run by the framework and its result sent back in the
  next request (the Agents SDK's ``stop_on_first_tool``; a capped tool loop for both);
* structured output into a pydantic model (the Agents SDK by ``json_schema``; Pydantic AI by its output tool);
* a streamed run.

Prints one line per check and exits 1 if any failed. Whether the 135M model answers well is not checked, only
that every answer has the shape asked for. Forced tool calls set ``parallel_tool_calls: false``: with parallel
calls allowed the 135M model repeats its call until ``max_tokens`` (see docs/http.md).

Neither framework is a dependency of dualpath: ``pip install openai-agents "pydantic-ai-slim[openai]"`` first.

    python3 benchmarks/agents_check.py
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checks import Checks  # noqa: E402
from _inprocess_server import inprocess_server  # noqa: E402

MAX_TOKENS = 64


def weather(city: str) -> str:
    """Get the weather for a city."""
    return f"sunny in {city}"


def openai_agents(check: Checks, url: str, model: str) -> None:
    from agents import (
        Agent,
        MaxTurnsExceeded,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    tool = function_tool(weather)
    plain = ModelSettings(max_tokens=MAX_TOKENS, temperature=0)
    forced = ModelSettings(max_tokens=MAX_TOKENS, temperature=0, tool_choice="required", parallel_tool_calls=False)

    events = asyncio.new_event_loop()  # one loop for every run: the client's connections belong to it
    run = events.run_until_complete

    for api, make in (("chat", lambda: OpenAIChatCompletionsModel(model=model, openai_client=client)),
                      ("responses", lambda: OpenAIResponsesModel(model=model, openai_client=client))):
        name = f"openai-agents/{api}"
        agent = Agent(name="plain", instructions="Be brief.", model=make(), model_settings=plain)
        first: dict[str, Any] = {}

        def one_turn(agent: Any = agent, first: dict[str, Any] = first) -> Any:
            first["r"] = run(Runner.run(agent, "Say hello.", max_turns=2))
            return first["r"]

        check(f"{name} one turn", one_turn,
              lambda r: bool(r.final_output) and r.context_wrapper.usage.input_tokens > 0)
        check(f"{name} history resent: prefix cached",
              lambda agent=agent, first=first: run(Runner.run(agent, first["r"].to_input_list()
                                                 + [{"role": "user", "content": "Again, shorter."}], max_turns=2)),
              lambda r: bool(r.final_output)
              and r.context_wrapper.usage.input_tokens_details.cached_tokens >= 16)
        stop = Agent(name="tool", instructions="Use the tool.", tools=[tool], model=make(), model_settings=forced,
                     tool_use_behavior="stop_on_first_tool")
        check(f"{name} forced tool call, run by the SDK",
              lambda stop=stop: run(Runner.run(stop, "What is the weather in Paris?", max_turns=2)),
              lambda r: isinstance(r.final_output, str) and r.final_output.startswith("sunny in ")
              and any(type(i).__name__ == "ToolCallOutputItem" for i in r.new_items))
        loop = Agent(name="loop", instructions="Use the tool, then answer.", tools=[tool], model=make(),
                     model_settings=forced)

        def tool_loop(loop: Any = loop) -> Any:  # the call's result goes back to the server in the next request
            try:
                return run(Runner.run(loop, "What is the weather in Paris?", max_turns=3)).new_items
            except MaxTurnsExceeded as exc:  # the 135M model may call again each turn: accepted, not answered
                return exc.run_data.new_items if exc.run_data else []

        check(f"{name} tool loop (results sent back)", tool_loop,
              lambda items: sum(type(i).__name__ == "ToolCallOutputItem" for i in items) >= 1
              and type(items[-1]).__name__ in ("ToolCallOutputItem", "MessageOutputItem")
              and len(items) >= 2)
        typed = Agent(name="typed", instructions="Extract the person.", output_type=Person, model=make(),
                      model_settings=plain)
        check(f"{name} structured output",
              lambda typed=typed: run(Runner.run(typed, "Alice is 30 years old.", max_turns=2)).final_output,
              lambda p: isinstance(p, Person))

        def streamed(agent: Any = agent) -> Any:
            async def go() -> tuple[int, Any]:
                rs = Runner.run_streamed(agent, "Count to three.", max_turns=2)
                n = 0
                async for _ in rs.stream_events():
                    n += 1
                return n, rs.final_output
            return run(go())

        check(f"{name} streamed", streamed, lambda r: r[0] >= 3 and bool(r[1]))
    run(client.close())
    events.close()


def pydantic_ai(check: Checks, url: str, model: str) -> None:
    from pydantic import BaseModel
    from pydantic_ai import Agent, capture_run_messages
    from pydantic_ai.exceptions import UsageLimitExceeded
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    class Person(BaseModel):
        name: str
        age: int

    provider = OpenAIProvider(base_url=f"{url}/v1", api_key="unused")
    settings: Any = {"max_tokens": MAX_TOKENS, "temperature": 0}
    for api, cls in (("chat", OpenAIChatModel), ("responses", OpenAIResponsesModel)):
        name = f"pydantic-ai/{api}"
        llm = cls(model, provider=provider)
        agent = Agent(llm, instructions="Be brief.", model_settings=settings)
        first: dict[str, Any] = {}

        def one_turn(agent: Any = agent, first: dict[str, Any] = first) -> Any:
            first["r"] = agent.run_sync("Say hello.")
            return first["r"]

        check(f"{name} one turn", one_turn, lambda r: bool(r.output) and r.usage.input_tokens > 0)
        check(f"{name} history resent: prefix cached",
              lambda agent=agent, first=first: agent.run_sync("Again, shorter.",
                                                              message_history=first["r"].all_messages()),
              lambda r: bool(r.output) and r.usage.cache_read_tokens >= 16)
        typed = Agent(llm, output_type=Person, model_settings=settings)  # its output tool, forced
        check(f"{name} structured output (output tool)", lambda typed=typed: typed.run_sync(
            "Alice is 30 years old.").output, lambda p: isinstance(p, Person))
        # a call forced to the function tool or the output tool at every step (Pydantic AI refuses a static
        # 'required', which would leave no way to finish): the function's result goes back in the next request
        tools = Agent(llm, instructions="Use the tool, then give the person.", tools=[weather], output_type=Person,
                      model_settings={**settings, "tool_choice": ["weather", "final_result"],
                                      "parallel_tool_calls": False})

        def tool_loop(tools: Any = tools) -> Any:  # stopped by the request limit if it never finishes
            with capture_run_messages() as messages, contextlib.suppress(UsageLimitExceeded):
                tools.run_sync("What is the weather where Alice (30) lives, in Paris?",
                               usage_limits=UsageLimits(request_limit=3))
            return [(type(m).__name__, type(p).__name__, getattr(p, "tool_name", "")) for m in messages
                    for p in m.parts]

        def sent_back(parts: list[tuple[str, str, str]]) -> bool:
            calls = [i for i, p in enumerate(parts) if p[1] == "ToolCallPart"]
            weather_back = [i for i, p in enumerate(parts) if p[1] == "ToolReturnPart" and p[2] == "weather"]
            # every step forced a call; a weather result was followed by another model response (accepted)
            return bool(calls) and (not weather_back or any(
                p[0] == "ModelResponse" for p in parts[weather_back[0]:]))

        check(f"{name} forced tool calls, results sent back", tool_loop, sent_back)

        def streamed(agent: Any = agent) -> Any:
            with agent.run_stream_sync("Count to three.") as st:
                return list(st.stream_text(delta=True))

        check(f"{name} streamed", streamed, lambda chunks: len(chunks) >= 3 and bool("".join(chunks)))


def main() -> int:
    with inprocess_server(Path(tempfile.mkdtemp(prefix="agents_"))) as url:
        import httpx

        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        check = Checks()
        openai_agents(check, url, model)
        pydantic_ai(check, url, model)
        return check.exit_code()


if __name__ == "__main__":
    sys.exit(main())
