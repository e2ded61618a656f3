"""A sparsifier's statistics: per tensor, per group, and the one-line summary of the log."""

from __future__ import annotations

from typing import Any

import torch

from sparsetrain.distributed import is_dtensor, local_part
from sparsetrain.sparsity import block_linear


@torch.no_grad()
def tensor_stats(sparsifier) -> list[dict[str, Any]]:
    """Per sparsified parameter: name, group, target sparsity (the group's level; for a dynamic
    group the level of its masks now), mask sparsity, actual fraction of exact zeros in the weight
    (a regrown weight is 0 until it trains), numel, kept (entries the mask keeps)."""
    model = sparsifier.model
    params = dict(model.named_parameters())
    packed = block_linear.packed_layers(model)
    rows = []
    for name, mask in sparsifier.masks.items():
        numel = mask.numel()
        kept = int(mask.sum().item())
        if name in packed:  # live blocks stored: every entry not stored is a zero
            blocks = packed[name].weight_blocks
            zeros_t = (blocks == 0).sum() + (numel - blocks.numel())
        else:
            zeros_t = (local_part(params[name]) == 0).sum()
            if is_dtensor(params[name]):  # a shard: add up the zeros of all ranks
                torch.distributed.all_reduce(zeros_t)
        zeros = int(zeros_t.item())
        settings = sparsifier.settings[name]
        mask_sparsity = (numel - kept) / numel if numel else 0.0
        rows.append({
            "name": name, "group": settings.group,
            "target": mask_sparsity if settings.dynamic is not None else settings.sparsity,
            "mask": mask_sparsity, "actual": zeros / numel if numel else 0.0, "numel": numel, "kept": kept,
        })
    return rows


def group_stats(sparsifier, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``tensor_stats`` (or the ``rows`` it already returned) summed per group, in config order:
    group, target, mask, actual, tensors, numel, kept; fractions weighted by tensor size (the
    target too: under ``distribution: erk`` each tensor has its own share of the group's level)."""
    groups: dict[str, dict[str, Any]] = {}
    for row in tensor_stats(sparsifier) if rows is None else rows:
        g = groups.setdefault(
            row["group"], {"group": row["group"], "tensors": 0, "numel": 0, "kept": 0, "zeros": 0.0, "targeted": 0.0},
        )
        g["tensors"] += 1
        g["numel"] += row["numel"]
        g["kept"] += row["kept"]
        g["zeros"] += row["actual"] * row["numel"]
        g["targeted"] += row["target"] * row["numel"]
    for g in groups.values():
        numel = max(g["numel"], 1)
        g["target"] = g.pop("targeted") / numel
        g["mask"] = (g["numel"] - g["kept"]) / numel
        g["actual"] = g.pop("zeros") / numel
    config = sparsifier.config
    order = [g.group for g in config.groups] if config is not None else []
    return sorted(groups.values(), key=lambda g: order.index(g["group"]) if g["group"] in order else len(order))


def summary(sparsifier) -> str:
    """One line: tensors, parameters covered, and the fraction pruned among them."""
    masks = sparsifier.masks
    total = block_linear.dense_numel(sparsifier.model)  # live-block layers at their dense size, as the masks
    covered = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum().item()) for m in masks.values())
    pruned = covered - kept
    share = pruned / covered if covered else 0.0
    return (
        f"{len(masks)} tensors, {covered:,} of {total:,} parameters, "
        f"{pruned:,} pruned ({share:.1%} of them, {pruned / max(total, 1):.1%} of the model)"
    )
