"""``config/sections.py``: the sections' defaults and the model presets."""

from __future__ import annotations

import pytest

from sparsetrain.config import PRESETS, params_from_dict


def test_defaults_and_sections(tiny_params):
    p = params_from_dict(tiny_params())
    assert p.model.hidden_size == 32
    assert p.train_input.section == "train_input" and p.eval_input.section == "eval_input"
    assert p.eval_input.shuffle is False  # evaluation reads consecutive windows by default
    assert p.sparsity is None


def test_preset_with_override():
    p = params_from_dict({"model": {"preset": "gpt3-xl", "num_hidden_layers": 2}})
    assert p.model.hidden_size == 2048 and p.model.num_hidden_layers == 2
    assert p.model.max_position_embeddings == 2048


@pytest.mark.parametrize("preset", list(PRESETS))
def test_all_presets_build(preset):
    p = params_from_dict({"model": {"preset": preset}})
    assert p.model.hidden_size % p.model.num_heads == 0
