"""Bytes of training state a plan implies: fp32 weights, their gradients and the optimizer state.

Activations, autocast's bf16 copies and library workspaces are not counted: they depend on batch
and context, not on sparsity (at GPT-3 XL, batch 8 x 2048, they are most of the peak;
BENCHMARKS.md measures whole peaks). Per-tensor scalars (Adam's ``step``) are left out too.

Three layouts, as ``training.setup`` makes them:

- **dense**: every entry 4 (weight) + 4 (gradient) + the optimizer's state (AdamW/Adam 8, SGD
  with momentum 4, plain SGD 0);
- **masked dense** (the CPU; unstructured and N:M weights on a GPU; block weights the kernels do
  not take): sparsified weights keep dense weights and gradients; with ``optimizer.packed_state``
  their state holds kept entries only, plus the packed optimizer's mask layout (one bit per
  entry and an int32 offset per 1024 entries);
- **block kernels** (CUDA, bf16): the layers on the kernels store their live blocks only, so
  weight, gradient and state exist for kept entries alone, with no mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sparsetrain.optim.packed_state import BLOCK as TILE  # entries per offset of the mask layout


def optimizer_state_per_entry(optimizer_type: str, momentum: float = 0.0) -> int:
    """Bytes of fp32 optimizer state per trained entry."""
    if optimizer_type in ("Adam", "AdamW"):
        return 8
    return 4 if momentum else 0


def packed_mask_bytes(numel: int) -> int:
    """The packed optimizer's layout for one weight: bits padded to whole tiles, one int32 per tile."""
    tiles = -(-numel // TILE)
    return tiles * TILE // 8 + 4 * tiles


def training_state_bytes(
    sparsified: Iterable[Mapping[str, Any]], other_numel: int, *, state_per_entry: int, packed_state: bool,
    kernels: bool,
) -> int:
    """Bytes of weights, gradients and optimizer state. ``sparsified``: rows with ``numel``,
    ``kept`` and ``gpu_kernels`` (as ``tools.plan`` gives them); ``other_numel``: the entries of
    every other parameter; ``kernels``: the layout on a GPU with the block kernels."""
    total = (8 + state_per_entry) * other_numel
    for row in sparsified:
        n, kept = row["numel"], row["kept"]
        if kernels and row.get("gpu_kernels"):
            total += (8 + state_per_entry) * kept
        elif packed_state:
            total += 8 * n + state_per_entry * kept + packed_mask_bytes(n)
        else:
            total += (8 + state_per_entry) * n
    return total


def plan_memory(rows: list[Mapping[str, Any]], other_numel: int, optimizer: Any, sparse: bool) -> dict[str, int | None]:
    """``dense``, ``masked_dense`` and ``block_kernels`` (None when no weight runs on the kernels)
    training-state bytes for a plan's rows and ``OptimizerParams``."""
    per_entry = optimizer_state_per_entry(optimizer.optimizer_type, optimizer.momentum)
    packed = sparse and optimizer.packed_state
    dense_rows = [{**r, "kept": r["numel"], "gpu_kernels": False} for r in rows]
    common = {"state_per_entry": per_entry}
    return {
        "dense": training_state_bytes(dense_rows, other_numel, packed_state=False, kernels=False, **common),
        "masked_dense": training_state_bytes(rows, other_numel, packed_state=packed, kernels=False, **common),
        "block_kernels": training_state_bytes(rows, other_numel, packed_state=packed, kernels=True, **common)
        if any(r.get("gpu_kernels") for r in rows) else None,
    }
