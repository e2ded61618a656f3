"""Helpers of the Hugging Face tests: both sides' models loaded from files."""

from __future__ import annotations

from pathlib import Path

import transformers

from sparsetrain import checkpoint as ckpt
from sparsetrain.config.fields import build_section
from sparsetrain.config.sections import ModelParams
from sparsetrain.model import GPT
from sparsetrain.sparsity.nan_format import decode_state_dict

# Weights far from GPT-2's 0.02, so logits are spread and greedy decoding has no near-ties.
WIDE_INIT = {"initializer": {"name": "normal", "std": 0.2}, "embedding_initializer": {"name": "normal", "std": 1.0}}


def our_model(path: Path) -> GPT:
    """Our GPT as ``generate`` builds it from a checkpoint: params from the checkpoint, NaN -> 0."""
    state = ckpt.load_checkpoint(path)
    model = GPT(build_section(ModelParams, state["params"]["model"], "model"))
    model.load_state_dict(decode_state_dict(state["model"])[0])
    return model.eval()


def hf_model(directory: Path) -> transformers.GPT2LMHeadModel:
    """``GPT2LMHeadModel.from_pretrained``, asserting that every tensor was there and used."""
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    return model.eval()
