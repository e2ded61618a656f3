"""``sparsity/masks.py``: masks from a tensor and settings -- exact pruned counts, topk against a
numpy oracle (ties to the lower index, NaN first), random masks reproducible in every process and
parameter order; block masks (Frobenius norm per block, partial edge blocks) and N:M masks, each
against its own oracle; the dispatch on init method and structure, and whether a mask fits."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.config.sparsity import GroupSettings
from sparsetrain.errors import ConfigError
from sparsetrain.kernels.blocks import block_grid, block_layout, is_block_structured, layout_to_mask
from sparsetrain.sparsity.masks import (
    block_random_mask,
    block_topk_mask,
    expected_pruned,
    from_zeros_mask,
    is_nm_structured,
    make_mask,
    mask_fits,
    mask_from_nan,
    nm_random_mask,
    nm_topk_mask,
    num_pruned,
    random_mask,
    topk_mask,
)
from tests.helpers import SRC

pytestmark = pytest.mark.usefixtures("one_thread")


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

_STRUCTURED_SCRIPT = r"""
import hashlib, sys, torch
from torch import nn
from sparsetrain.sparsity import sparsify
torch.manual_seed(int(sys.argv[2]))
shapes = {"alpha": (16, 24), "beta": (20, 12), "gamma": (8, 8)}
names = list(shapes) if sys.argv[1] == "forward" else list(reversed(shapes))
model = nn.ModuleDict({n: nn.Linear(shapes[n][1], shapes[n][0]) for n in names})
block = {"init_method": "random", "seed": 77, "param_name_patterns": {
    "alpha|gamma": {"sparsity": 0.5, "structure": "block", "block_size": [4, 8]},
    "beta": {"structure": "2:4"}}}
sp = sparsify(model, block)
for name in sorted(sp.masks):
    print(name, hashlib.sha256(sp.masks[name].numpy().tobytes()).hexdigest())
"""


def _run_masks(*runs: tuple[str, str, str], script: str = _SCRIPT) -> list[str]:
    """The masks' digests printed by ``script`` in a fresh process for each of ``runs``
    (``(order, hash_seed, torch_seed)``: parameters in ``order``). The processes run at once
    (each is mostly its imports, on one core of a two-core machine); each is still its own."""
    procs = []
    for order, hash_seed, torch_seed in runs:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(SRC)}
        cmd = [sys.executable, "-c", script, order, torch_seed]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out)
    return outputs


def test_random_masks_identical_across_processes_and_parameter_orders():
    first, second = _run_masks(("forward", "1", "0"), ("reversed", "2", "99"))
    assert first == second
    assert len(first.splitlines()) == 3
    here = random_mask("alpha.weight", (6, 10), 0.5, 1234)
    expected = hashlib.sha256(here.numpy().tobytes()).hexdigest()
    assert f"alpha.weight {expected}" in first


def test_random_structured_masks_identical_across_processes_and_orders():
    first, second = _run_masks(("forward", "1", "0"), ("reversed", "2", "99"), script=_STRUCTURED_SCRIPT)
    assert first == second
    assert len(first.splitlines()) == 3
    digest = hashlib.sha256(block_random_mask("alpha.weight", (16, 24), 0.5, 77, (4, 8)).numpy().tobytes())
    assert f"alpha.weight {digest.hexdigest()}" in first
    digest = hashlib.sha256(nm_random_mask("beta.weight", (20, 12), 2, 4, 77).numpy().tobytes())
    assert f"beta.weight {digest.hexdigest()}" in first


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


# -- block masks -------------------------------------------------------------------------------


def _reference_block_topk(weight: np.ndarray, sparsity: float, br: int, bc: int) -> np.ndarray:
    """numpy oracle: Frobenius norm per block (edge blocks partial), keep the largest
    ``blocks - round(s * blocks)``, ties -> lower row-major block index, NaN smallest."""
    rows, cols = weight.shape
    grid_r, grid_c = -(-rows // br), -(-cols // bc)
    norms = np.empty(grid_r * grid_c)
    for i in range(grid_r):
        for j in range(grid_c):
            tile = weight[i * br:(i + 1) * br, j * bc:(j + 1) * bc].astype(np.float64)
            norms[i * grid_c + j] = math.sqrt(float((tile * tile).sum()))
    norms[np.isnan(norms)] = -1.0
    n = norms.size
    order = np.lexsort((np.arange(n), -norms))
    kept = np.zeros(n, dtype=bool)
    kept[order[: n - round(sparsity * n)]] = True
    mask = np.zeros_like(weight, dtype=bool)
    for b in np.nonzero(kept)[0]:
        i, j = divmod(int(b), grid_c)
        mask[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = True
    return mask


SHAPES = [(32, 32), (37, 29), (5, 3), (16, 100), (1, 7), (130, 17)]

BLOCKS = [(4, 4), (8, 8), (16, 4), (3, 5), (128, 128)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_block_counts_exact_incl_partial_edge_blocks(shape, block, sparsity):
    grid = block_grid(shape, block)
    assert grid == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    blocks = grid[0] * grid[1]
    weight = torch.randn(shape)
    for mask in (block_topk_mask(weight, sparsity, block), block_random_mask("w", shape, sparsity, 3, block)):
        assert mask.shape == torch.Size(shape) and mask.dtype == torch.bool
        assert is_block_structured(mask, block)
        layout = block_layout(mask, block)
        assert layout.shape == grid
        assert blocks - int(layout.sum()) == round(sparsity * blocks)
        assert torch.equal(layout_to_mask(layout, block, shape), mask)


def test_partial_edge_blocks_prune_fewer_entries():
    # 10x10 in 4x4 blocks: a 3x3 grid of 16-, 8- and 4-entry blocks; prune the 4-entry corner only.
    weight = torch.ones(10, 10)
    weight[8:, 8:] = 0.1
    mask = block_topk_mask(weight, 1 / 9, 4)
    assert int((~mask).sum()) == 4 and not mask[8:, 8:].any() and mask[:8].all()


def test_expected_pruned_of_topk_edge_blocks_matches_fresh_weights():
    for shape, block, s in [((32, 128), (16, 24), 0.75), ((100, 100), (32, 32), 0.5), ((130, 17), (128, 128), 0.5)]:
        settings = GroupSettings(s, "topk", 0, None, "block", block)
        count, exact = expected_pruned("w", shape, settings)
        assert not exact
        weight = torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
        assert int((~make_mask("w", weight, settings)).sum()) == count
    settings = GroupSettings(0.5, "random", 3, None, "block", (16, 24))
    count, exact = expected_pruned("w", (32, 128), settings)
    assert exact and count == int((~block_random_mask("w", (32, 128), 0.5, 3, (16, 24))).sum())
    assert expected_pruned("w", (64, 64), GroupSettings(0.75, "topk", 0, None, "block", (16, 16))) == (3072, True)
    assert expected_pruned("w", (64, 64), GroupSettings(0.5, "topk", 0, None, "2:4")) == (2048, True)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("shape", "block"), [((12, 20), (4, 4)), ((13, 11), (4, 3)), ((9, 9), (2, 5)), ((6, 8), (1, 1))])
def test_block_topk_matches_numpy_reference(seed, shape, block):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    if seed % 3 == 1:  # many ties: quantised magnitudes, whole equal blocks
        weight = weight.round().clamp(-1, 1)
    if seed % 3 == 2:
        weight.view(-1)[torch.randperm(weight.numel(), generator=gen)[:3]] = float("nan")
        weight.view(-1)[0] = float("inf")
    for s in (0.25, 0.5, 0.8):
        expected = _reference_block_topk(weight.numpy(), s, *block)
        assert np.array_equal(block_topk_mask(weight, s, block).numpy(), expected), (s, block)


def test_block_topk_ties_keep_lower_block_and_nan_block_goes_first():
    weight = torch.ones(4, 8)  # a 2x2 grid of equal 2x4 blocks
    mask = block_topk_mask(weight, 0.5, (2, 4))
    assert block_layout(mask, (2, 4)).tolist() == [[True, True], [False, False]]
    weight[0, 0] = float("nan")
    assert block_layout(block_topk_mask(weight, 0.25, (2, 4)), (2, 4)).tolist() == [[False, True], [True, True]]


def test_block_topk_ranks_by_frobenius_norm_not_max():
    weight = torch.zeros(2, 4)
    weight[0, 0] = 3.0  # block 0: norm 3
    weight[:, 2:] = 1.6  # block 1: four entries, norm 3.2
    assert block_layout(block_topk_mask(weight, 0.5, 2), 2).tolist() == [[False, True]]


def test_block_random_depends_on_seed_name_and_is_superset_monotone():
    a = block_random_mask("layers.0.mlp.fc.weight", (64, 32), 0.5, 1, 8)
    torch.manual_seed(5)
    assert torch.equal(a, block_random_mask("layers.0.mlp.fc.weight", (64, 32), 0.5, 1, 8))
    assert not torch.equal(a, block_random_mask("layers.0.mlp.fc.weight", (64, 32), 0.5, 2, 8))
    assert not torch.equal(a, block_random_mask("layers.1.mlp.fc.weight", (64, 32), 0.5, 1, 8))
    low = block_random_mask("w", (64, 32), 0.3, 0, 8)
    high = block_random_mask("w", (64, 32), 0.7, 0, 8)
    assert bool((~low <= ~high).all())


def test_block_masks_of_higher_dimensional_weights_use_first_dim_rows():
    weight = torch.randn(8, 2, 3)  # a matrix 8 x 6
    mask = block_topk_mask(weight, 0.5, (4, 3))
    assert mask.shape == weight.shape
    assert is_block_structured(mask.reshape(8, 6), (4, 3))
    assert int((~mask).sum()) == 2 * 12


# -- N:M masks ---------------------------------------------------------------------------------


def _reference_nm(weight: np.ndarray, n: int, m: int) -> np.ndarray:
    flat = weight.reshape(-1, m).astype(np.float64)
    mask = np.zeros(flat.shape, dtype=bool)
    for g in range(flat.shape[0]):
        magnitude = np.abs(flat[g])
        magnitude[np.isnan(magnitude)] = -1.0
        order = np.lexsort((np.arange(m), -magnitude))
        mask[g, order[:n]] = True
    return mask.reshape(weight.shape)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (1, 2), (4, 8), (3, 7), (16, 64)])
@pytest.mark.parametrize(("lead", "groups"), [((8,), 1), ((3,), 7), ((1,), 5), ((2, 3), 3)])
def test_nm_keeps_exactly_n_of_each_m(n, m, lead, groups):
    shape = (*lead, groups * m)
    weight = torch.randn(shape)
    for mask in (nm_topk_mask(weight, n, m), nm_random_mask("w", shape, n, m, seed=4)):
        assert mask.shape == torch.Size(shape) and is_nm_structured(mask, n, m)
        assert int(mask.reshape(-1, m).sum(dim=1).min()) == n == int(mask.reshape(-1, m).sum(dim=1).max())
        assert int((~mask).sum()) == round((1 - n / m) * weight.numel())
    assert np.array_equal(nm_topk_mask(weight, n, m).numpy(), _reference_nm(weight.numpy(), n, m))


def test_nm_topk_ties_lower_index_and_nan_smallest():
    weight = torch.tensor([[1.0, -1.0, 1.0, 0.5, float("nan"), 2.0, 0.0, 0.0]])
    assert nm_topk_mask(weight, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]
    weight = torch.tensor([[1.0, float("nan"), 1.0, 1.0]], dtype=torch.bfloat16)
    assert nm_topk_mask(weight, 2, 4).tolist() == [[True, False, True, False]]


def test_nm_runs_along_the_last_dimension():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert nm_topk_mask(weight, 2, 4).tolist() == [[False, False, True, True], [True, True, False, False]]
    assert is_nm_structured(torch.tensor([[True, False, False, True]]), 2, 4)
    assert not is_nm_structured(torch.tensor([[True, True, True, False]]), 2, 4)
    assert is_nm_structured(torch.tensor([[True, False, False, False]]), 2, 4, exact=False)
    assert not is_nm_structured(torch.ones(2, 6, dtype=torch.bool), 2, 4)


def test_nm_random_depends_on_name_and_seed_only():
    a = nm_random_mask("a", (8, 16), 2, 4, seed=1)
    torch.manual_seed(9)
    assert torch.equal(a, nm_random_mask("a", (8, 16), 2, 4, seed=1))
    assert not torch.equal(a, nm_random_mask("b", (8, 16), 2, 4, seed=1))
    assert not torch.equal(a, nm_random_mask("a", (8, 16), 2, 4, seed=2))


def test_make_mask_dispatches_on_structure():
    weight = torch.randn(16, 24)
    g = GroupSettings(0.5, "topk", 0, None, "block", (8, 8))
    assert torch.equal(make_mask("w", weight, g), block_topk_mask(weight, 0.5, 8))
    g = GroupSettings(0.5, "random", 3, None, "block", (8, 4))
    assert torch.equal(make_mask("w", weight, g), block_random_mask("w", (16, 24), 0.5, 3, (8, 4)))
    g = GroupSettings(0.5, "topk", 0, None, "2:4")
    assert torch.equal(make_mask("w", weight, g), nm_topk_mask(weight, 2, 4))
    g = GroupSettings(0.75, "random", 5, None, "1:4")
    assert torch.equal(make_mask("w", weight, g), nm_random_mask("w", (16, 24), 1, 4, 5))
    g = GroupSettings(0.5, "from_zeros", 0, None, "block", (8, 8))
    weight[0, 0] = 0.0
    assert torch.equal(make_mask("w", weight, g), from_zeros_mask(weight))
    assert torch.equal(make_mask("w", weight, GroupSettings(0.5, "topk", 0, None)), topk_mask(weight, 0.5))
    assert torch.equal(make_mask("w", weight, GroupSettings(0.5, "random", 1, None)), random_mask("w", (16, 24), 0.5, 1))


def test_nm_on_a_shape_not_divisible_by_m_names_parameter_and_shape():
    with pytest.raises(ConfigError, match=r"'layers.0.fc.weight' of shape \(8, 30\).*not a multiple of 4"):
        make_mask("layers.0.fc.weight", torch.randn(8, 30), GroupSettings(0.5, "topk", 0, None, "2:4"))


def test_mask_fits():
    weight = torch.randn(16, 24)
    block = GroupSettings(0.5, "topk", 0, None, "block", (8, 8))
    nm = GroupSettings(0.5, "topk", 0, None, "2:4")
    flat = GroupSettings(0.5, "topk", 0, None)
    assert mask_fits(make_mask("w", weight, block), block)
    assert not mask_fits(topk_mask(weight, 0.5), block)  # right count, no block structure
    assert not mask_fits(block_topk_mask(weight, 0.25, 8), block)  # blocks, wrong count
    assert mask_fits(make_mask("w", weight, nm), nm) and not mask_fits(topk_mask(weight, 0.5), nm)
    assert mask_fits(make_mask("w", weight, nm), flat)
