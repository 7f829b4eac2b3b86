"""BLIP-2 and InstructBLIP checkpoints serve their language model (OPT, or a Llama such as Vicuna): a text prompt has
no image, so the Q-Former's query embeddings are not part of it and the logits are the language model's own. Against
transformers' models on random weights they wrote (the language model under ``language_model.``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import check_two_chunks_against_hf, load_checkpoint, random_turns

from dualpath.errors import ModelError
from dualpath.model.spec import ModelSpec, load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
VISION: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
QFORMER: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "encoder_hidden_size": 16}
OPT: dict[str, Any] = {"model_type": "opt", "vocab_size": VOCAB, "hidden_size": 32, "ffn_dim": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 32,
                       "max_position_embeddings": 64, "pad_token_id": 1}
LLAMA: dict[str, Any] = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "max_position_embeddings": 64, "pad_token_id": None}


class _LanguageModel(torch.nn.Module):
    """transformers' image-text model's language model and head, called on token ids (what a text prompt runs)."""

    def __init__(self, hf: Any) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> Any:
        lm = self.hf.language_model
        if hasattr(lm, "lm_head"):
            return lm(ids)
        return type("Out", (), {"logits": self.hf.lm_head(lm(ids).last_hidden_state)})()


@pytest.mark.parametrize("model_cls,config_cls,text", [
    ("Blip2ForConditionalGeneration", "Blip2Config", OPT),
    ("InstructBlipForConditionalGeneration", "InstructBlipConfig", LLAMA),
    ("InstructBlipVideoForConditionalGeneration", "InstructBlipVideoConfig", OPT),
])
def test_the_language_model_of_a_blip_checkpoint(tmp_path, model_cls, config_cls, text):
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(
        vision_config=VISION, qformer_config=QFORMER, text_config=text)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.startswith(("language_model.", "lm_head.")) and p.dim() > 1:
                p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert spec.architecture == text["model_type"]
    with torch.no_grad():
        want = _LanguageModel(hf)(torch.tensor([list(range(3, 20))])).logits[0]
    assert float(want.abs().max()) > 0.5
    check_two_chunks_against_hf(load_checkpoint(tmp_path), _LanguageModel(hf), random_turns(VOCAB, 4, (17,))[0],
                                cut=9)


def test_an_encoder_decoder_language_model_is_named():
    """BLIP-2 over Flan-T5 (an encoder-decoder language model) is refused, naming the text model's type."""
    with pytest.raises(ModelError, match="text_config.model_type 't5' of a blip-2 checkpoint is unsupported"):
        ModelSpec.from_hf_config({"architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2",
                                  "text_config": {"model_type": "t5"}})
