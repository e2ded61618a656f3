"""Masks: exact counts, topk against a numpy oracle, random masks reproducible everywhere."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.config.sparsity import GroupSettings
from sparsetrain.sparsity.masks import (
    from_zeros_mask,
    make_mask,
    mask_from_nan,
    num_pruned,
    random_mask,
    topk_mask,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def _reference_topk(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep the n - round(s n) largest |w|, lower index first among ties, NaN smallest."""
    flat = weight.reshape(-1).astype(np.float64)
    magnitude = np.abs(flat)
    magnitude[np.isnan(magnitude)] = -1.0
    n = flat.size
    order = np.lexsort((np.arange(n), -magnitude))  # primary: -|w|, then index
    mask = np.zeros(n, dtype=bool)
    mask[order[: n - round(sparsity * n)]] = True
    return mask.reshape(weight.shape)


@pytest.mark.parametrize(
    ("numel", "sparsity", "pruned"),
    [(5, 0.5, 2), (7, 0.5, 4), (10, 0.3, 3), (21, 0.75, 16), (1, 0.5, 0), (3, 0.5, 2), (12, 0.0, 0), (9, 0.99, 9)],
)
def test_num_pruned_rounds_half_to_even(numel, sparsity, pruned):
    assert num_pruned(numel, sparsity) == pruned


@pytest.mark.parametrize("shape", [(5,), (7,), (3, 7), (1, 1), (2, 3, 5)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_counts_are_exact(shape, sparsity):
    numel = int(np.prod(shape))
    weight = torch.randn(shape)
    for mask in (topk_mask(weight, sparsity), random_mask("w", shape, sparsity, seed=3)):
        assert mask.dtype == torch.bool and mask.shape == torch.Size(shape)
        assert int((~mask).sum()) == round(sparsity * numel)


def test_half_way_counts_for_both_methods():
    assert int((~topk_mask(torch.randn(5), 0.5)).sum()) == 2
    assert int((~topk_mask(torch.randn(7), 0.5)).sum()) == 4
    assert int((~random_mask("x", (5,), 0.5, 0)).sum()) == 2
    assert int((~random_mask("x", (7,), 0.5, 0)).sum()) == 4


def test_topk_ties_keep_the_lower_index():
    weight = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0])
    assert topk_mask(weight, 0.4).tolist() == [True, True, True, False, False]
    assert topk_mask(torch.zeros(6), 0.5).tolist() == [True] * 3 + [False] * 3


def test_topk_prunes_nan_first():
    weight = torch.tensor([float("nan"), 0.0, -1.0, float("inf")])
    assert topk_mask(weight, 0.25).tolist() == [False, True, True, True]
    assert topk_mask(weight, 0.5).tolist() == [False, False, True, True]


_VALUES = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 1e-30, float("nan"), float("inf"), -3.25])


@settings(max_examples=200, deadline=None, database=None)
@given(
    values=st.lists(st.one_of(_VALUES, st.floats(-4, 4, width=32)), min_size=1, max_size=40),
    sparsity=st.floats(0.0, 0.99),
    rows=st.sampled_from([1, 2]),
)
def test_topk_matches_numpy_reference(values, sparsity, rows):
    weight = np.array(values * rows, dtype=np.float32).reshape(rows, -1)
    expected = _reference_topk(weight, sparsity)
    assert np.array_equal(topk_mask(torch.from_numpy(weight), sparsity).numpy(), expected)


def test_topk_half_precision_and_ignores_grad():
    weight = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    expected = _reference_topk(weight.detach().float().numpy(), 0.5)
    assert np.array_equal(topk_mask(weight, 0.5).numpy(), expected)


def test_random_mask_depends_on_seed_name_and_sparsity_only():
    base = random_mask("layers.0.mlp.fc.weight", (16, 8), 0.5, seed=1)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(base, random_mask("layers.0.mlp.fc.weight", (16, 8), 0.5, seed=1))
    assert not torch.equal(base, random_mask("layers.0.mlp.fc.weight", (16, 8), 0.5, seed=2))
    assert not torch.equal(base, random_mask("layers.1.mlp.fc.weight", (16, 8), 0.5, seed=1))


def test_random_mask_higher_sparsity_prunes_a_superset():
    low = random_mask("w", (10, 10), 0.3, seed=0)
    high = random_mask("w", (10, 10), 0.7, seed=0)
    assert bool((~low <= ~high).all())


def test_random_mask_is_not_topk():
    weight = torch.arange(1.0, 101.0).reshape(10, 10)
    mask = random_mask("w", weight.shape, 0.5, seed=0)
    assert not torch.equal(mask, topk_mask(weight, 0.5))


_SCRIPT = r"""
import hashlib, sys, torch
from torch import nn
from sparsetrain.sparsity import sparsify
torch.manual_seed(int(sys.argv[2]))
shapes = {"alpha": (6, 10), "beta": (7, 3), "gamma": (5, 5)}
names = list(shapes) if sys.argv[1] == "forward" else list(reversed(shapes))
model = nn.ModuleDict({n: nn.Linear(shapes[n][1], shapes[n][0]) for n in names})
sp = sparsify(model, {"sparsity": 0.5, "init_method": "random", "seed": 1234})
for name in sorted(sp.masks):
    print(name, hashlib.sha256(sp.masks[name].numpy().tobytes()).hexdigest())
"""


def _run_masks(order: str, hash_seed: str, torch_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, order, torch_seed], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout


def test_random_masks_identical_across_processes_and_parameter_orders():
    first = _run_masks("forward", "1", "0")
    second = _run_masks("reversed", "2", "99")
    assert first == second
    assert len(first.splitlines()) == 3
    here = random_mask("alpha.weight", (6, 10), 0.5, 1234)
    expected = hashlib.sha256(here.numpy().tobytes()).hexdigest()
    assert f"alpha.weight {expected}" in first


def test_from_zeros_keeps_nonzero_non_nan():
    weight = torch.tensor([0.0, -0.0, float("nan"), 1.0, -2.0, 1e-30])
    assert from_zeros_mask(weight).tolist() == [False, False, False, True, True, True]


def test_mask_from_nan():
    assert mask_from_nan(torch.tensor([1.0, float("nan"), 0.0])).tolist() == [True, False, True]


def test_make_mask_dispatches_on_init_method():
    weight = torch.tensor([[3.0, 0.0], [-1.0, 0.5]])
    assert torch.equal(make_mask("w", weight, GroupSettings(0.5, "topk", 0, None)), topk_mask(weight, 0.5))
    assert torch.equal(make_mask("w", weight, GroupSettings(0.5, "random", 4, None)), random_mask("w", (2, 2), 0.5, 4))
    assert make_mask("w", weight, GroupSettings(0.9, "from_zeros", 0, None)).tolist() == [[True, False], [True, True]]
    with pytest.raises(ValueError):
        make_mask("w", weight, GroupSettings(0.5, "bogus", 0, None))
