"""Dynamic sparsity's mask updates: exact counts, which units go and come, blocks as units."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.kernels.blocks import block_layout, is_block_structured
from sparsetrain.sparsity.mask_updates import (
    drop_and_regrow,
    prune_further,
    regrow_noise,
    unit_scores,
)
from sparsetrain.sparsity.masks import num_pruned, random_mask


def _brute_drop_regrow(kept, drop_score, grow_score, level, fraction):
    """The rule written out with Python lists: the oracle."""
    n, k = len(kept), sum(kept)
    target = n - round(level * n)
    d = max(round(fraction * k), k - target)
    kept_idx = sorted((i for i in range(n) if kept[i]), key=lambda i: (-drop_score[i], i))
    after = set(kept_idx[: k - d])
    r = max(0, target - len(after))
    candidates = sorted((i for i in range(n) if i not in after), key=lambda i: (-grow_score[i], i))
    return after | set(candidates[:r]), d, r


@pytest.mark.parametrize("shape, level, fraction", [
    ((16, 24), 0.75, 0.3), ((7, 13), 0.9, 0.5), ((64,), 0.5, 0.0), ((5, 9), 0.3, 1.0), ((32, 32), 0.75, 0.017),
])
def test_drop_and_regrow_matches_the_rule_and_keeps_counts(shape, level, fraction):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    mask = random_mask("w", shape, level, 3)
    w = w * mask
    grow = torch.randn(shape, generator=g).abs()
    change = drop_and_regrow(mask, unit_scores(w, None), grow.reshape(-1), level, fraction)
    n = mask.numel()
    expected, d, r = _brute_drop_regrow(mask.reshape(-1).tolist(), w.abs().reshape(-1).tolist(), grow.reshape(-1).tolist(), level, fraction)
    got = set(torch.nonzero(change.mask.reshape(-1)).reshape(-1).tolist())
    assert got == expected
    k = int(mask.sum())
    assert (change.dropped, change.regrown) == (d, r) == (round(fraction * k), round(fraction * k))
    assert n - int(change.mask.sum()) == num_pruned(n, level)  # exact count after the update
    assert change.new == int((change.mask & ~mask).sum()) <= r


def test_drop_takes_smallest_magnitudes_and_rigl_regrows_largest_gradients():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    w = torch.tensor([0.5, -0.1, 2.0, 0.05, 0, 0, 0, 0])
    g = torch.tensor([0, 0, 0, 0, 0.1, -3.0, 0.2, 1.0])
    change = drop_and_regrow(mask, unit_scores(w, None), unit_scores(g, None), 0.5, 0.5)
    # drop 2 of 4 (0.05 and -0.1), regrow the 2 largest |g| among the 6 pruned: indices 5 and 7
    assert change.mask.tolist() == [True, False, True, False, False, True, False, True]
    assert (change.dropped, change.regrown, change.new) == (2, 2, 2)


def test_a_dropped_unit_can_be_regrown_and_then_is_no_churn():
    mask = torch.tensor([True, True, False, False])
    w = torch.tensor([1.0, 0.1, 0, 0])
    g = torch.tensor([0.0, 9.0, 0.0, 0.0])  # the dropped entry has the largest gradient
    change = drop_and_regrow(mask, unit_scores(w, None), unit_scores(g, None), 0.5, 0.5)
    assert change.mask.tolist() == [True, True, False, False]
    assert (change.dropped, change.regrown, change.new) == (1, 1, 0)


def test_blocks_are_units_scored_by_their_norm():
    torch.manual_seed(1)
    block = (4, 4)
    w = torch.randn(16, 32)
    layout = torch.zeros(4, 8, dtype=torch.bool)
    layout.view(-1)[torch.randperm(32)[:8]] = True
    from sparsetrain.kernels.blocks import layout_to_mask

    mask = layout_to_mask(layout, block, w.shape)
    w = w * mask
    grad = torch.randn(16, 32)
    change = drop_and_regrow(mask, unit_scores(w, block), unit_scores(grad, block), 0.75, 0.25, block)
    assert is_block_structured(change.mask, block)
    new_layout = block_layout(change.mask, block)
    assert int(new_layout.sum()) == 8 and (change.dropped, change.regrown) == (2, 2)
    assert change.units == 32
    # the regrown blocks are among the pruned-after-drop blocks of largest gradient norm
    norms = unit_scores(grad, block)
    survivors = layout.reshape(-1) & new_layout.reshape(-1)
    grown = new_layout.reshape(-1) & ~survivors
    others = ~new_layout.reshape(-1)
    assert norms[grown].min() >= norms[others & ~survivors].max()


def test_a_level_that_rises_is_reached_at_once():
    """From 50% to 80% with drop fraction 0.1: the zoo would drop 10% of the kept and regrow none
    (sparsity 0.55); here the update ends at the new level's exact count."""
    torch.manual_seed(3)
    mask = random_mask("w", (10, 10), 0.5, 0)
    w = torch.randn(10, 10) * mask
    change = drop_and_regrow(mask, unit_scores(w, None), torch.rand(100), 0.8, 0.1)
    assert int(change.mask.sum()) == 20 and (change.dropped, change.regrown) == (30, 0)
    assert not (change.mask & ~mask).any()
    kept, dropped = w.abs()[change.mask], w.abs()[mask & ~change.mask]
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize("level", [0.5, 0.8, 0.95])
def test_prune_further_only_prunes(level):
    torch.manual_seed(2)
    w = torch.randn(20, 10)
    mask = torch.rand(20, 10) > 0.3
    change = prune_further(mask, unit_scores(w * mask, None), level)
    n = mask.numel()
    target = n - num_pruned(n, level)
    assert int(change.mask.sum()) == min(target, int(mask.sum()))
    assert not (change.mask & ~mask).any()  # nothing regrown
    kept = (w * mask).abs()[change.mask]
    dropped = (w * mask).abs()[mask & ~change.mask]
    if dropped.numel():
        assert kept.min() >= dropped.max()


def test_prune_further_at_a_lower_level_changes_nothing():
    mask = torch.tensor([True, False, False, False])
    change = prune_further(mask, torch.ones(4), 0.25)
    assert torch.equal(change.mask, mask) and change.dropped == 0


def test_regrow_noise_is_a_pure_function_of_seed_name_and_step():
    a = regrow_noise("w", 0, 100, 50)
    assert torch.equal(a, regrow_noise("w", 0, 100, 50))
    assert not torch.equal(a, regrow_noise("w", 0, 200, 50))
    assert not torch.equal(a, regrow_noise("v", 0, 100, 50))
    assert not torch.equal(a, regrow_noise("w", 1, 100, 50))


def _stable_reference(mask, drop_score, grow_score, level, fraction):
    """The rule with full stable sorts (the definition the top-k selection must equal)."""
    kept = mask.reshape(-1).clone()
    n, k = kept.numel(), int(kept.sum())
    d = min(max(round(fraction * k), k - (n - num_pruned(n, level))), k)

    def order(scores, allowed):  # allowed units only, in index order, then a stable sort
        index = allowed.nonzero().squeeze(1)
        s = scores[index].double()
        s = s.masked_fill(torch.isnan(s), -float("inf"))
        return index[torch.sort(s, descending=True, stable=True).indices]

    after = torch.zeros_like(kept)
    after[order(drop_score, kept)[: k - d]] = True
    r = max(0, n - num_pruned(n, level) - (k - d))
    new = after.clone()
    new[order(grow_score, ~after)[:r]] = True
    return new.view(mask.shape)


@pytest.mark.parametrize("seed", range(12))
def test_topk_selection_equals_stable_sorts_with_ties_and_nan(seed):
    g = torch.Generator().manual_seed(seed)
    shape = (9, 17)
    mask = torch.rand(shape, generator=g) < 0.4
    # few distinct values: many ties at every threshold; some NaN
    drop = torch.randint(0, 4, shape, generator=g).float().reshape(-1)
    grow = torch.randint(0, 3, shape, generator=g).float().reshape(-1)
    drop[torch.randint(0, drop.numel(), (3,), generator=g)] = float("nan")
    grow[torch.randint(0, grow.numel(), (3,), generator=g)] = float("nan")
    for level, fraction in ((0.6, 0.3), (0.5, 0.9), (0.8, 0.0), (0.3, 0.5)):
        change = drop_and_regrow(mask, drop, grow, level, fraction)
        assert torch.equal(change.mask, _stable_reference(mask, drop, grow, level, fraction)), (seed, level, fraction)
