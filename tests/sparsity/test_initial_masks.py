"""``sparsity/initial_masks.py``: masks given to ``sparsify`` (as recovered from a NaN checkpoint)
are kept where the block still asks for them, redrawn at another sparsity (old zeros pruned
first), dropped for parameters the block no longer selects, refused when they do not fit; and
``from_zeros`` takes the weights' existing zeros. On the toy GPT."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsetrain.errors import CheckpointError
from sparsetrain.sparsity.masks import num_pruned, topk_mask
from sparsetrain.sparsity.sparsifier import sparsify
from tests.helpers import BLOCK_MATRICES, TOY_SPARSITY, toy_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = TOY_SPARSITY
MATRICES = BLOCK_MATRICES


def test_given_masks_are_kept_not_redrawn():
    first = sparsify(toy_gpt(seed=0), BLOCK)
    model = toy_gpt(seed=1)  # other weights: topk would choose other masks
    sparsifier = sparsify(model, BLOCK, masks=first.masks)
    for name, mask in first.masks.items():
        assert torch.equal(sparsifier.masks[name], mask)
        assert bool((model.get_parameter(name).detach()[~mask] == 0).all())
    assert not torch.equal(topk_mask(toy_gpt(seed=1).lm_head.weight, 0.3), first.masks["lm_head.weight"])


def test_given_masks_with_sparsity_zero_make_the_weights_dense():
    first = sparsify(toy_gpt(), BLOCK)
    sparsifier = sparsify(toy_gpt(), {"sparsity": 0.0}, masks={n: first.masks[n] for n in MATRICES})
    assert all(bool(mask.all()) for mask in sparsifier.masks.values())


def test_given_masks_at_another_sparsity_are_redrawn(logs):
    first = sparsify(toy_gpt(), {"sparsity": 0.5})
    with logs.at_level(logging.WARNING):
        sparsifier = sparsify(toy_gpt(), {"sparsity": 0.75}, masks=first.masks)
    assert "drawing a new topk mask" in logs.text
    for name, mask in sparsifier.masks.items():
        assert int((~mask).sum()) == num_pruned(mask.numel(), 0.75)
        assert bool((~first.masks[name] <= ~mask).all())  # old zeros are pruned first


def test_given_masks_for_unselected_parameters_warn(logs):
    first = sparsify(toy_gpt(), {"sparsity": 0.5})
    with logs.at_level(logging.WARNING):
        sparsifier = sparsify(toy_gpt(), {"sparsity": 0.5, "param_name_patterns": "ffn"}, masks=first.masks)
    assert "they train dense" in logs.text
    assert all("ffn" in name for name in sparsifier.masks)


def test_given_masks_that_do_not_fit_the_model():
    model = toy_gpt()
    with pytest.raises(CheckpointError, match="'decoder.weight'"):
        sparsify(model, BLOCK, masks={"decoder.weight": torch.ones(2, 2, dtype=torch.bool)})
    name = "transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"
    with pytest.raises(CheckpointError, match=rf"'{name}': shape \(2, 2\)"):
        sparsify(model, BLOCK, masks={name: torch.ones(2, 2, dtype=torch.bool)})


def test_from_zeros_takes_the_existing_zeros(logs):
    model = toy_gpt()
    with torch.no_grad():
        fc = model.transformer_decoder.layers[0].ffn.ffn[0].linear_layer
        fc.weight[:, ::2] = 0
    with logs.at_level(logging.WARNING):
        sparsifier = sparsify(model, {"sparsity": 0.5, "init_method": "from_zeros", "param_name_patterns": "ffn.0"})
    assert torch.equal(sparsifier.masks["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"], fc.weight != 0)
    assert bool(sparsifier.masks["transformer_decoder.layers.1.ffn.ffn.0.linear_layer.weight"].all())
    assert "transformer_decoder.layers.1.ffn.ffn.0.linear_layer.weight 0.0%" in logs.text
