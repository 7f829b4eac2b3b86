"""instructor (structured extraction through the ``openai`` client, a library nobody here wrote) against
``dualpath serve --http``.

Starts ``dualpath serve --http --inprocess`` with the embedded SmolLM2 and extracts pydantic models in
instructor's constrained modes: ``TOOLS`` and ``TOOLS_STRICT`` (a forced tool call), ``FUNCTIONS`` (the legacy
``functions`` with a forced ``function_call``), ``JSON`` and ``JSON_SCHEMA``
(``response_format``), a nested model (a list of models: ``$defs`` and ``$ref`` in the tool's parameters), a
partial stream, an iterable, and the async client. Prints one line per check and exits 1 if any failed. The
free-text modes (``MD_JSON``, ``PARALLEL_TOOLS`` with ``tool_choice: auto``) are left out: there the output is
the 135M model's own, unconstrained.

instructor is not a dependency of dualpath: install it first (``pip install instructor``).

    python3 benchmarks/instructor_check.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checks import Checks  # noqa: E402
from _inprocess_server import inprocess_server  # noqa: E402


def main() -> int:
    import httpx
    import instructor
    import openai
    from pydantic import BaseModel, Field

    class User(BaseModel):
        name: str
        age: int

    class Users(BaseModel):
        users: list[User] = Field(max_length=3)

    with inprocess_server(Path(tempfile.mkdtemp(prefix="instructor_"))) as url:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        ask = {"model": model, "max_tokens": 256, "temperature": 0,
               "messages": [{"role": "user", "content": "Extract: Jason is 25 years old."}]}
        two = {**ask, "messages": [{"role": "user", "content": "Extract: Jason is 25, Mary is 30."}]}

        def client(mode: Any) -> Any:
            return instructor.from_openai(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0),
                                          mode=mode)

        check = Checks()


        for mode in ("TOOLS", "TOOLS_STRICT", "FUNCTIONS", "JSON", "JSON_SCHEMA"):
            check(mode, lambda m=mode: client(getattr(instructor.Mode, m)).chat.completions.create(
                response_model=User, max_retries=0, **ask), lambda u: isinstance(u, User))
        tools = client(instructor.Mode.TOOLS)
        check("nested ($defs)", lambda: tools.chat.completions.create(response_model=Users, max_retries=0, **two),
              lambda us: isinstance(us, Users) and len(us.users) >= 1)
        check("partial stream", lambda: list(tools.chat.completions.create_partial(response_model=User, **ask)),
              lambda ps: len(ps) >= 1 and ps[-1].name is not None and ps[-1].age is not None)
        check("iterable", lambda: list(tools.chat.completions.create_iterable(response_model=User, **two)),
              lambda us: all(isinstance(u, User) for u in us))
        aclient = instructor.from_openai(openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0),
                                         mode=instructor.Mode.TOOLS)
        check("async", lambda: asyncio.run(aclient.chat.completions.create(response_model=User, max_retries=0,
                                                                           **ask)),
              lambda u: isinstance(u, User))
    return check.exit_code()


if __name__ == "__main__":
    sys.exit(main())
