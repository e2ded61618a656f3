"""How dynamic sparsity changes a mask at an update step: pure functions of the current mask,
scores and counts (no model, no optimizer), so the counts can be pinned exactly.

Units: a mask is changed entry by entry (``unstructured``) or block by block (``structure:
block``: whole blocks kept or pruned, scored by the Frobenius norm of the block, float64).

- :func:`drop_and_regrow` (SET, RigL): of the ``k`` kept units drop ``d = round(drop_fraction * k)``
  with the smallest drop score (|w|), or ``k - target`` when the level rose by more than that
  (``target = n - round(level * n)``); then regrow ``r = target - (k - d)`` among the units not kept
  after the drop, those of largest regrow score (random for SET, |dense gradient| for RigL). Every
  update ends at exactly ``target`` kept units; at a constant level ``r = d``. (The zoo drops only
  the fraction, so a rising level is reached over several updates; here at once.)
  A unit dropped and regrown at the same update is kept (the zoo's and the RigL paper's rule),
  so the mask's churn can be smaller than ``d``.
- :func:`prune_further` (GMP): keep the ``target`` kept units of largest |w|; a target above the
  current count changes nothing (GMP never regrows).

Ties keep the lower unit index (what a stable sort gives, found with a top-k and a threshold);
NaN scores rank lowest. Regrow scores of units kept after the drop never matter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from sparsetrain.kernels.blocks import BlockLayout, block_grid, block_layout, layout_to_mask, matrix_shape
from sparsetrain.sparsity.masks import block_norms, num_pruned


@dataclass(frozen=True)
class MaskChange:
    """A new mask and what the update did, in units (entries, or blocks)."""

    mask: torch.Tensor
    units: int  # entries or blocks in the tensor
    kept: int
    dropped: int
    regrown: int
    new: int  # units kept now that were not kept before (the churn)
    layout: torch.Tensor | None  # block structure: the live-block grid of ``mask``
    kept_entries: int  # entries ``mask`` keeps


def unit_scores(tensor: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """Per-unit magnitude, flat: ``|t|`` (float32, float64 kept) or each block's Frobenius norm
    (float32 over whole blocks, one pass; float64 with partial edge blocks)."""
    t = tensor.detach()
    if block is None:
        return t.abs().to(torch.float64 if t.dtype == torch.float64 else torch.float32).reshape(-1)
    (br, bc), (rows, cols) = block, matrix_shape(t.shape)
    if t.dtype != torch.float64 and rows % br == 0 and cols % bc == 0:
        view = t.reshape(rows // br, br, cols // bc, bc).float()
        return torch.linalg.vector_norm(view, dim=(1, 3)).reshape(-1)
    return block_norms(t, block).reshape(-1)


def stored_block_units(blocks: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """For a weight stored as its live blocks ``(nnz, br, bc)`` in ``layout``'s order: each block's
    norm and whether it is live, flat over the grid (norm 0 at dead blocks), without unpacking it."""
    rows, cols = layout.grid
    cells = layout.blk_rows.long() * cols + layout.row_cols.long()
    scores = torch.zeros(rows * cols, dtype=torch.float32, device=blocks.device)
    scores[cells] = torch.linalg.vector_norm(blocks.detach().float(), dim=(1, 2))
    kept = torch.zeros(rows * cols, dtype=torch.bool, device=blocks.device)
    kept[cells] = True
    return scores, kept


def unit_mask(mask: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """The mask's kept units, flat bool: entries, or live blocks."""
    return (mask if block is None else block_layout(mask, block)).reshape(-1).to(torch.bool)


def from_units(kept: torch.Tensor, like: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    if block is None:
        return kept.view(like.shape)
    return layout_to_mask(kept.view(block_grid(like.shape, block)), block, like.shape)


def _change(mask, old_kept, new_kept, block, dropped, regrown) -> MaskChange:
    """The record of an update from ``old_kept`` to ``new_kept`` units of ``mask``."""
    kept = int(new_kept.sum())
    if block is None:
        kept_entries = kept
    elif all(d % b == 0 for d, b in zip(matrix_shape(mask.shape), block, strict=True)):
        kept_entries = kept * block[0] * block[1]  # whole blocks: no pass over the entries
    else:
        kept_entries = None
    entries = mask if new_kept is old_kept else from_units(new_kept, mask, block)  # unchanged: the same tensor
    layout = None if block is None else new_kept.view(block_grid(mask.shape, block))
    return MaskChange(entries, new_kept.numel(), kept, dropped, regrown, int((new_kept & ~old_kept).sum()), layout,
                      int(entries.sum()) if kept_entries is None else kept_entries)


def _ranked(scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``allowed`` units' indices (ascending) and their scores, NaN as -inf (ranked lowest)."""
    index = allowed.nonzero().squeeze(1)
    s = scores[index]
    return index, s.masked_fill(torch.isnan(s), -float("inf"))


def _largest(scores: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` allowed units of largest score; among equal scores the lower
    index wins (what a stable descending sort would pick), found with one top-k and a threshold
    instead of a sort: a sort of every candidate costs far more for the few that are taken."""
    index, s = _ranked(scores, allowed)
    return index[_pick(s, count, largest=True)]


def _smallest(scores: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` allowed units of smallest score (NaN first); among equal scores
    the HIGHER index goes first, so that the units left are those a stable descending sort keeps."""
    index, s = _ranked(scores, allowed)
    return index[_pick(s, count, largest=False)]


def _pick(s: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    n = s.numel()
    count = min(max(count, 0), n)
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=s.device)
    if count == n:
        return torch.arange(n, device=s.device)
    threshold = torch.topk(s, count, largest=largest, sorted=False).values
    threshold = threshold.min() if largest else threshold.max()
    beyond = (s > threshold) if largest else (s < threshold)
    taken = beyond.nonzero().squeeze(1)
    ties = (s == threshold).nonzero().squeeze(1)
    need = count - taken.numel()
    ties = ties[:need] if largest else ties[ties.numel() - need:]
    return torch.cat([taken, ties])


def drop_and_regrow(
    mask: torch.Tensor,
    drop_score: torch.Tensor,
    regrow_score: torch.Tensor,
    level: float,
    drop_fraction: float,
    block: tuple[int, int] | None = None,
    kept: torch.Tensor | None = None,
) -> MaskChange:
    """SET / RigL's update of one tensor's mask; scores are per unit (see :func:`unit_scores`);
    ``kept``: the mask's kept units, flat, when the caller has them (else read off ``mask``)."""
    kept = unit_mask(mask, block) if kept is None else kept
    n = kept.numel()
    k = int(kept.sum())
    target = n - num_pruned(n, level)
    # Drop the fraction, or more when the level rose past it (the zoo then lags the level; here
    # every update ends at the level's exact count).
    d = min(max(round(drop_fraction * k), k - target, 0), k)
    after = kept.clone()
    after[_smallest(drop_score.reshape(-1), kept, d)] = False
    r = max(0, target - (k - d))
    grown = _largest(regrow_score.reshape(-1), ~after, r)
    new_kept = after.clone()
    new_kept[grown] = True
    return _change(mask, kept, new_kept, block, d, r)


def prune_further(
    mask: torch.Tensor, score: torch.Tensor, level: float, block: tuple[int, int] | None = None,
    kept: torch.Tensor | None = None,
) -> MaskChange:
    """GMP's update: the ``n - round(level * n)`` kept units of largest score stay."""
    kept = unit_mask(mask, block) if kept is None else kept
    n = kept.numel()
    k = int(kept.sum())
    target = n - num_pruned(n, level)
    if target >= k:
        return _change(mask, kept, kept, block, 0, 0)
    new_kept = kept.clone()
    new_kept[_smallest(score.reshape(-1), kept, k - target)] = False
    return _change(mask, kept, new_kept, block, k - target, 0)


def regrow_noise(name: str, seed: int, step: int, units: int, device: torch.device | str | None = None) -> torch.Tensor:
    """SET's random regrow scores: uniform, a pure function of (seed, parameter name, step) and
    the device type, drawn on ``device`` by a generator seeded from their hash: every rank and a
    resumed run draw the same without any stored RNG state (a run resumed on another device
    type, CPU vs CUDA, draws other values)."""
    digest = hashlib.blake2b(f"set:{seed}:{name}:{step}".encode(), digest_size=8).digest()
    device = torch.device(device or "cpu")
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") % 2**63)
    return torch.rand(units, generator=generator, device=device)
