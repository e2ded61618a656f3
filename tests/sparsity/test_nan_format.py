"""``sparsity/nan_format.py``: the NaN checkpoint encoding (SPEC §4) -- encode, decode, densify,
and resume from it exactly."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from sparsetrain.sparsity.nan_format import (
    decode_optimizer_state,
    decode_state_dict,
    densify,
    encode_optimizer_state,
    encode_state_dict,
)
from sparsetrain.sparsity.sparsifier import sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = {"sparsity": 0.5, "param_name_patterns": {"0": {"init_method": "random", "seed": 9}, "2": {"sparsity": 0.75}}}


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5), nn.LayerNorm(5))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def _trained(steps: int = 3):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sparsifier = sparsify(model, BLOCK, optimizer)
    for step in range(steps):
        _step(model, optimizer, step)
    return model, optimizer, sparsifier


def test_encode_puts_nan_exactly_at_pruned_positions_and_copies():
    model, _, sparsifier = _trained()
    state = model.state_dict()
    original = {k: v.clone() for k, v in state.items()}
    encoded = encode_state_dict(state, sparsifier.masks)
    for name, value in encoded.items():
        mask = sparsifier.masks.get(name)
        if mask is None:
            assert not torch.isnan(value).any()
            assert torch.equal(value, original[name])
        else:
            assert torch.equal(torch.isnan(value), ~mask)
            assert torch.equal(value[mask], original[name][mask])
    for name, value in state.items():  # input untouched
        assert torch.equal(value, original[name])
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_state_dict_round_trip():
    model, _, sparsifier = _trained()
    state = model.state_dict()
    clean, masks = decode_state_dict(encode_state_dict(state, sparsifier.masks))
    assert set(masks) == set(sparsifier.masks)
    for name, mask in masks.items():
        assert torch.equal(mask, sparsifier.masks[name])
    for name, value in clean.items():
        assert torch.equal(value, state[name])


def test_optimizer_state_round_trip():
    model, optimizer, sparsifier = _trained()
    opt_sd = optimizer.state_dict()
    original = copy.deepcopy(opt_sd)
    encoded = encode_optimizer_state(opt_sd, optimizer, model, sparsifier.masks)
    names = [name for name, _ in model.named_parameters()]
    for index, entry in encoded["state"].items():
        mask = sparsifier.masks.get(names[index])
        for key, value in entry.items():
            if mask is not None and key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(torch.isnan(value), ~mask), (names[index], key)
            else:
                assert not torch.isnan(value).any()
    assert torch.equal(opt_sd["state"][0]["exp_avg"], original["state"][0]["exp_avg"])  # not mutated
    decoded = decode_optimizer_state(encoded)
    assert decoded["param_groups"] == original["param_groups"]
    for index, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(decoded["state"][index][key], value)


def test_resume_from_nan_checkpoint_reproduces_training():
    model, optimizer, sparsifier = _trained(steps=3)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": encode_state_dict(model.state_dict(), sparsifier.masks),
            "optimizer": encode_optimizer_state(optimizer.state_dict(), optimizer, model, sparsifier.masks),
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _model(seed=1)  # other initial weights: only the checkpoint may decide
    model_sd, masks = decode_state_dict(saved["model"])
    resumed.load_state_dict(model_sd)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=0.01, weight_decay=0.1)
    resumed_opt.load_state_dict(decode_optimizer_state(saved["optimizer"]))
    resumed_sparsifier = sparsify(resumed, BLOCK, resumed_opt, masks=masks)
    for name, mask in sparsifier.masks.items():
        assert torch.equal(resumed_sparsifier.masks[name], mask)
    for step in range(3, 6):
        _step(model, optimizer, step)
        _step(resumed, resumed_opt, step)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_densify_nested():
    nan = float("nan")
    state = {"a": torch.tensor([nan, 1.0]), "b": [torch.tensor([nan]), (torch.tensor([2, 3]), "x")], "c": 4}
    dense = densify(state)
    assert dense["a"].tolist() == [0.0, 1.0]
    assert dense["b"][0].tolist() == [0.0]
    assert dense["b"][1][0].tolist() == [2, 3] and dense["b"][1][1] == "x" and dense["c"] == 4
    assert torch.isnan(state["a"][0])  # input untouched
    assert densify(torch.tensor([float("inf"), nan])).tolist() == [float("inf"), 0.0]


def test_decode_only_masks_tensors_with_nan():
    clean, masks = decode_state_dict({"w": torch.tensor([[1.0, 0.0]]), "n": torch.tensor([2, 3]), "s": 5})
    assert masks == {}
    assert clean["s"] == 5


def test_half_precision_round_trip():
    weight = torch.randn(4, 4, dtype=torch.bfloat16)
    mask = torch.rand(4, 4) > 0.5
    weight[~mask] = 0
    clean, masks = decode_state_dict(encode_state_dict({"w": weight}, {"w": mask}))
    assert torch.equal(masks["w"], mask) and torch.equal(clean["w"], weight)


def test_encode_errors():
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(KeyError, match="'missing'"):
        encode_state_dict({"w": torch.zeros(2, 2)}, {"missing": mask})
    with pytest.raises(ValueError, match="shape"):
        encode_state_dict({"w": torch.zeros(3)}, {"w": mask})
    with pytest.raises(ValueError, match="floating"):
        encode_state_dict({"w": torch.zeros(2, 2, dtype=torch.int64)}, {"w": mask})


def test_encode_warns_about_nan_at_kept_positions(logs):
    weight = torch.tensor([float("nan"), 1.0])
    encode_state_dict({"w": weight}, {"w": torch.tensor([True, False])})
    assert "NaN at kept positions" in logs.text


def test_encode_optimizer_state_rejects_a_foreign_state_dict():
    model, optimizer, sparsifier = _trained(steps=1)
    other = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="parameter groups"):
        encode_optimizer_state(other.state_dict(), optimizer, model, sparsifier.masks)
