"""Erdős–Rényi-Kernel (ERK) per-tensor sparsities for one group (Evci et al. 2020, "Rigging the
Lottery: Making All Tickets Winners", the RigL paper).

Formula. Tensor i of shape ``(d_1, ..., d_r)`` gets the density (kept fraction)

    density_i = eps * sum(d) / prod(d)        # 2-D (n_out, n_in): eps * (n_in + n_out) / (n_in * n_out)

with one factor ``eps`` for the whole group, chosen so that the group keeps ``(1 - s)`` of its
entries in total. Larger tensors get sparser; a 1-D or 3-D+ shape uses the sum and product of all
its dimensions (for a conv kernel ``(out, in, h, w)`` this is the paper's "kernel" variant).

Dense cap (as in the RigL reference code, ``get_sparsities`` with power 1). When the tensor(s)
with the largest ``sum/prod`` would get a density above 1, they are made dense (sparsity 0.0),
their entries are taken out of the budget, ``eps`` is solved again for the rest, and so on until
no density exceeds 1.

Exact count. The group prunes exactly ``num_pruned(total_numel, s)`` entries in all, counted the
way each tensor's mask counts them (:func:`sparsetrain.sparsity.masks.num_pruned`,
``round(s_i * numel_i)``). The ideal pruned counts ``(1 - density_i) * numel_i`` (exact rational
arithmetic) are floored and the missing entries go one each to the largest fractional parts
(largest remainder; ties to the lower name in sorted order); each tensor's sparsity is then
``pruned_i / numel_i``, so ``num_pruned(numel_i, s_i) == pruned_i``.

What the paper claims for it: at the same number of parameters, ERK trains to better accuracy than
a uniform sparsity, but it costs more FLOPs than uniform (the small layers it keeps denser are
often the compute-heavy ones); at equal FLOPs that advantage is not claimed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from fractions import Fraction

from sparsetrain.sparsity.masks import num_pruned

__all__ = ["erk_sparsities"]


def _check(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, tuple[int, ...]]:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"ERK sparsity must be a number in [0, 1), got {sparsity!r}")
    if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"ERK sparsity must be in [0, 1), got {sparsity!r}")
    if not shapes:
        raise ValueError("ERK needs at least one tensor shape")
    checked = {}
    for name, shape in shapes.items():
        dims = tuple(shape)
        if not dims or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims):
            raise ValueError(f"ERK: tensor {name!r} has shape {dims}; need one or more positive integer dimensions")
        checked[name] = tuple(int(d) for d in dims)
    return checked


def _densities(numel: Mapping[str, int], raw: Mapping[str, Fraction], sparsity: Fraction) -> dict[str, Fraction]:
    """ERK densities with the dense cap: dense tensors get exactly 1."""
    dense: set[str] = set()
    while True:
        live = [name for name in numel if name not in dense]
        budget = (1 - sparsity) * sum(numel.values()) - sum(numel[name] for name in dense)
        eps = budget / sum(raw[name] * numel[name] for name in live)
        top = max(raw[name] for name in live)
        if eps * top <= 1:
            break
        dense.update(name for name in live if raw[name] == top)
    return {name: Fraction(1) if name in dense else eps * raw[name] for name in numel}


def _largest_remainder(ideal: Mapping[str, Fraction], numel: Mapping[str, int], total: int) -> dict[str, int]:
    """Integer counts near ``ideal`` (each in ``[0, numel]``) that add up to ``total``."""
    pruned = {name: min(math.floor(x), numel[name]) for name, x in ideal.items()}
    order = sorted(ideal, key=lambda name: (-(ideal[name] - pruned[name]), name))
    missing = total - sum(pruned.values())
    # Normally 0 <= missing <= len(ideal); below 0 only if the float count round(s * N) fell below
    # the exact one, then the smallest remainders give an entry back.
    step = 1 if missing > 0 else -1
    ranked = order if step > 0 else order[::-1]
    while missing:
        room = [name for name in ranked if 0 <= pruned[name] + step <= numel[name]][: abs(missing)]
        assert room, "no tensor can take the remaining count"
        for name in room:
            pruned[name] += step
        missing -= step * len(room)
    return pruned


def erk_sparsities(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """Per-tensor sparsities of one group under ERK at global sparsity ``sparsity``.

    Args:
        shapes: each tensor's shape, by name.
        sparsity: the fraction of the group's entries to prune, in [0, 1).

    Returns:
        ``{name: s_i}`` in sorted name order: densities ``1 - s_i`` proportional to
        ``sum(shape) / prod(shape)`` (to within one entry per tensor), tensors whose density
        would exceed 1 dense (0.0), and ``sum(num_pruned(numel_i, s_i))`` equal to
        ``num_pruned(sum(numel_i), sparsity)`` exactly. See the module docstring.

    Raises:
        ValueError: ``sparsity`` outside [0, 1), no shapes, or a shape with no or non-positive
            dimensions.
    """
    checked = _check(shapes, sparsity)
    names = sorted(checked)
    numel = {name: math.prod(checked[name]) for name in names}
    raw = {name: Fraction(sum(checked[name]), numel[name]) for name in names}
    density = _densities(numel, raw, Fraction(float(sparsity)))
    ideal = {name: (1 - density[name]) * numel[name] for name in names}
    pruned = _largest_remainder(ideal, numel, num_pruned(sum(numel.values()), sparsity))
    assert sum(pruned.values()) == num_pruned(sum(numel.values()), sparsity)
    return {name: pruned[name] / numel[name] for name in names}
