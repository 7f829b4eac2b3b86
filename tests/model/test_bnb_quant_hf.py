"""bitsandbytes checkpoints (``dualpath.model.bnb_quant``): three in ``tests/data/bnb``, quantized by bitsandbytes
itself through transformers' ``BitsAndBytesConfig`` and written by transformers' ``save_pretrained``
(``make_fixtures.py``): NF4 with double quantization and modules left unquantized (``llm_int8_skip_modules``), FP4
over a Qwen2 with biases, and LLM.int8. The reference logits are transformers' own run of the quantized 4-bit
models, and of the weights bitsandbytes dequantizes for the 8-bit one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_random import check_fixture_logits
from safetensors.torch import load_file, save_file

from dualpath.errors import ModelError
from dualpath.model.bnb_quant import bnb_dequantized
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model

BNB = Path(__file__).parents[1] / "data" / "bnb"
FIXTURES = ("llama_nf4_double_quant", "qwen2_fp4", "llama_int8")
W = "model.layers.0.self_attn.q_proj.weight"


def _load(d: Any) -> Any:
    return load_model(LlamaModelConfig(path=str(d), time_model="off"), with_tokenizer=False)[0]


@pytest.mark.parametrize("name", FIXTURES)
def test_bnb_checkpoint_gives_transformers_logits(name):
    check_fixture_logits(BNB / name)


def test_nf4_fixture_holds_double_quantization_and_unquantized_modules():
    """The fixture exercises what it names: nested absmax codes, and plain weights beside quantized ones."""
    t = load_file(str(BNB / "llama_nf4_double_quant" / "checkpoint" / "model.safetensors"))
    assert t[W + ".absmax"].dtype == torch.uint8 and W + ".nested_absmax" in t
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16  # (llm_int8_skip_modules)
    state = json.loads(bytes(t[W + ".quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert state["nested_offset"] != 0 and state["blocksize"] == 64
    dense = bnb_dequantized(t)
    assert dense[W].shape == (64, 64) and not any(".absmax" in k or "quant_state" in k for k in dense)


def _broken(tmp_path: Path, name: str, edit: Any) -> Path:
    d = tmp_path / name
    shutil.copytree(BNB / name / "checkpoint", d)
    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"))
    return d


def test_bnb_refusals_name_the_tensor(tmp_path):
    def bad_state(t: dict[str, torch.Tensor]) -> None:
        t[W + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)

    def short_absmax(t: dict[str, torch.Tensor]) -> None:
        t[W + ".absmax"] = t[W + ".absmax"][:-1].contiguous()

    def no_nested(t: dict[str, torch.Tensor]) -> None:
        del t[W + ".nested_quant_map"]

    def scb_rows(t: dict[str, torch.Tensor]) -> None:
        name = "model.layers.1.mlp.up_proj.SCB"
        t[name] = t[name][:5].contiguous()

    for name, edit, match in (
            ("llama_nf4_double_quant", bad_state, r"q_proj.weight.quant_state.bitsandbytes__nf4' is not a bitsandbytes"),
            ("llama_nf4_double_quant", short_absmax, r"q_proj.weight': 2048 byte\(s\), 63 absmax"),
            ("llama_nf4_double_quant", no_nested, r"q_proj.weight' with double quantization needs"),
            ("llama_int8", scb_rows, r"up_proj.SCB' \(5 rows\) needs the int8 weight")):
        with pytest.raises(ModelError, match=match):
            _load(_broken(tmp_path / edit.__name__, name, edit))
    d = tmp_path / "flags"
    shutil.copytree(BNB / "llama_int8" / "checkpoint", d)
    cfg = json.loads((d / "config.json").read_text())
    q = {k: v for k, v in cfg["quantization_config"].items() if "load_in" not in k}
    (d / "config.json").write_text(json.dumps(dict(cfg, quantization_config=q)))
    with pytest.raises(ModelError, match="sets neither load_in_4bit nor load_in_8bit"):
        _load(d)
