"""``sparsity/masks.py``, ``checkerboard``: exact pruned counts, kept entries evenly spread (gaps at
most ceil(n / k)), against a pure-Python oracle of the rule; block and N:M variants; the dispatch
in ``make_mask``, ``mask_fits`` and ``expected_pruned``."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetrain.config.sparsity import GroupSettings
from sparsetrain.kernels.blocks import block_grid, block_layout, is_block_structured
from sparsetrain.sparsity.masks import (
    block_checkerboard_layout,
    block_checkerboard_mask,
    checkerboard_mask,
    even_keep,
    expected_pruned,
    is_nm_structured,
    make_mask,
    mask_fits,
    nm_checkerboard_mask,
    num_pruned,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1,), (5,), (7,), (3, 7), (1, 1), (2, 3, 5), (16, 16), (13, 17), (64, 48), (1, 1000), (1000, 1)]
SPARSITIES = [0.0, 0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 0.99]


def _oracle(n: int, k: int) -> list[bool]:
    return [(i + 1) * k // n > i * k // n for i in range(n)]


def _max_gap(keep: torch.Tensor) -> int:
    """Largest distance between consecutive kept indices, counting from a virtual index -1."""
    kept = [-1] + torch.nonzero(keep.reshape(-1)).flatten().tolist()
    return max(b - a for a, b in zip(kept, kept[1:]))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 64, 97, 1000])
def test_even_keep_matches_the_rule_for_every_k(n):
    for k in range(n + 1):
        keep = even_keep(n, k)
        assert keep.dtype == torch.bool and keep.tolist() == _oracle(n, k)
        assert int(keep.sum()) == k
        if k:
            assert _max_gap(keep) <= math.ceil(n / k)
            assert bool(keep[-1])


def test_even_keep_rejects_impossible_counts():
    with pytest.raises(ValueError):
        even_keep(4, 5)
    with pytest.raises(ValueError):
        even_keep(4, -1)
    assert even_keep(0, 0).shape == (0,)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_counts_are_exact_and_spread_even(shape, sparsity):
    mask = checkerboard_mask(shape, sparsity)
    n = math.prod(shape)
    kept = n - num_pruned(n, sparsity)
    assert mask.dtype == torch.bool and mask.shape == torch.Size(shape)
    assert int((~mask).sum()) == num_pruned(n, sparsity)
    assert mask.reshape(-1).tolist() == _oracle(n, kept)
    if kept:
        assert _max_gap(mask) <= math.ceil(n / kept)


def test_half_sparsity_alternates():
    assert checkerboard_mask((8,), 0.5).tolist() == [False, True] * 4
    assert checkerboard_mask((6,), 2 / 3).tolist() == [False, False, True] * 2
    assert checkerboard_mask((4,), 0.25).tolist() == [False, True, True, True]
    assert checkerboard_mask((2, 4), 0.75).tolist() == [[False, False, False, True]] * 2


def test_zero_sparsity_keeps_all():
    assert bool(checkerboard_mask((13, 7), 0.0).all())
    assert bool(block_checkerboard_mask((13, 7), 0.0, (4, 4)).all())
    assert bool(make_mask("w", torch.randn(9, 5), GroupSettings(0.0, "checkerboard", 0, None)).all())


def test_deterministic_and_independent_of_weights_name_and_seed():
    a = make_mask("a", torch.randn(33, 21), GroupSettings(0.7, "checkerboard", 0, None))
    b = make_mask("b", torch.zeros(33, 21), GroupSettings(0.7, "checkerboard", 99, None))
    assert torch.equal(a, b)
    assert torch.equal(a, checkerboard_mask((33, 21), 0.7))


@pytest.mark.parametrize(
    ("shape", "block"),
    [
        ((16, 16), (4, 4)),
        ((13, 17), (4, 4)),
        ((64, 48), (8, 16)),
        ((5,), (1, 2)),
        ((8, 3, 3), (2, 3)),
        ((7, 7), (7, 7)),
    ],
)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_block_prunes_whole_blocks_exactly_and_evenly(shape, block, sparsity):
    mask = block_checkerboard_mask(shape, sparsity, block)
    assert mask.shape == torch.Size(shape)
    assert is_block_structured(mask, block)
    grid = block_grid(shape, block)
    blocks = grid[0] * grid[1]
    layout = block_layout(mask, block)
    assert layout.numel() - int(layout.sum()) == num_pruned(blocks, sparsity)
    assert torch.equal(layout, block_checkerboard_layout(shape, sparsity, block))
    assert layout.reshape(-1).tolist() == _oracle(blocks, blocks - num_pruned(blocks, sparsity))


@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (3, 7)])
def test_nm_keeps_n_evenly_spread_in_each_run_of_m(n, m):
    shape = (6, 3 * m)
    mask = nm_checkerboard_mask(shape, n, m)
    assert mask.shape == torch.Size(shape)
    assert is_nm_structured(mask, n, m)
    groups = mask.reshape(-1, m)
    assert all(row == _oracle(m, n) for row in groups.tolist())
    assert _max_gap(groups[0]) <= math.ceil(m / n)


def test_nm_checks_the_shape():
    with pytest.raises(ValueError):
        nm_checkerboard_mask((4, 6), 2, 4)


def _settings(sparsity, **kw):
    return GroupSettings(sparsity, "checkerboard", 0, None, **kw)


@pytest.mark.parametrize(
    "settings",
    [
        _settings(0.75),
        _settings(0.3),
        _settings(0.75, structure="block", block_size=(4, 4)),
        _settings(0.6, structure="block", block_size=(3, 5)),
        _settings(0.5, structure="2:4"),
        _settings(0.75, structure="1:4"),
    ],
    ids=lambda s: f"{s.structure_label}-{s.sparsity}",
)
@pytest.mark.parametrize("shape", [(16, 32), (13, 24), (8, 4, 4)])
def test_make_mask_dispatch_fits_and_expected_pruned(settings, shape):
    weight = torch.randn(shape)
    mask = make_mask("layer.weight", weight, settings)
    assert mask.dtype == torch.bool and mask.shape == weight.shape and mask.device == weight.device
    assert mask_fits(mask, settings)
    pruned, exact = expected_pruned("layer.weight", shape, settings)
    assert exact and pruned == int((~mask).sum())
    if settings.structure == "unstructured":
        assert torch.equal(mask, checkerboard_mask(shape, settings.sparsity))
    elif settings.structure == "block":
        assert torch.equal(mask, block_checkerboard_mask(shape, settings.sparsity, settings.block_size))
    else:
        assert torch.equal(mask, nm_checkerboard_mask(shape, *settings.nm))


def test_mask_fits_rejects_a_wrong_count():
    settings = _settings(0.5)
    mask = checkerboard_mask((8, 8), 0.5)
    mask[0, 0] = ~mask[0, 0]
    assert not mask_fits(mask, settings)


def test_nm_shape_error_names_the_parameter():
    from sparsetrain.errors import ConfigError

    with pytest.raises(ConfigError, match="layer.weight"):
        make_mask("layer.weight", torch.randn(4, 6), _settings(0.5, structure="2:4"))


@pytest.mark.cuda
def test_same_mask_on_the_gpu():
    settings = _settings(0.7, structure="block", block_size=(4, 4))
    cpu = make_mask("w", torch.randn(37, 29), settings)
    gpu = make_mask("w", torch.randn(37, 29, device="cuda"), settings)
    assert gpu.is_cuda and torch.equal(cpu, gpu.cpu())
    assert torch.equal(checkerboard_mask((1001,), 0.37), checkerboard_mask((1001,), 0.37, "cuda").cpu())
