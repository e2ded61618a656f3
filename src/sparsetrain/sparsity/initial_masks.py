"""The masks a sparsifier starts from: masks given to it (recovered from a NaN checkpoint) kept
where the ``sparsity:`` block still asks for them, drawn from the weights otherwise.

Resuming never re-draws or compounds a stored mask that fits its group (same structure, same
pruned count); ``sparsity: 0.0`` makes a weight dense; any other change draws a new mask from
the current weights, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from sparsetrain.config.sparsity import GroupSettings
from sparsetrain.errors import CheckpointError
from sparsetrain.sparsity.masks import make_mask, mask_fits

log = logging.getLogger(__name__)


def check_given(
    masks: Mapping[str, torch.Tensor],
    params: Mapping[str, nn.Parameter],
    settings: Mapping[str, GroupSettings],
) -> dict[str, torch.Tensor]:
    for name, mask in masks.items():
        if name not in params:
            raise CheckpointError(f"sparsity mask for {name!r}: the model has no such parameter")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"sparsity mask for {name!r}: shape {tuple(mask.shape)}, the parameter {tuple(params[name].shape)}"
            )
    unused = [name for name in masks if name not in settings]
    if unused:
        log.warning(
            "sparsity: %d stored mask(s) belong to parameters the sparsity block does not select; they train dense: %s",
            len(unused),
            ", ".join(unused[:10]) + (", ..." if len(unused) > 10 else ""),
        )
    return {name: mask.to(torch.bool) for name, mask in masks.items() if name in settings}


def mask_for(name: str, param: torch.Tensor, group: GroupSettings, given: torch.Tensor | None) -> torch.Tensor:
    if given is None:
        return make_mask(name, param, group)
    given = given.to(param.device)
    if group.init_method == "from_zeros":
        return given
    if group.dynamic is not None and _structure_fits(given, group):
        return given  # a dynamic run's mask at its last update: its level is the schedule's, not the start's
    if mask_fits(given, group):
        return given
    if group.sparsity == 0.0:
        log.info("sparsity: %s is made dense (sparsity 0.0)", name)
        return torch.ones_like(given)
    pruned = given.numel() - int(given.sum().item())
    log.warning(
        "sparsity: stored mask of %s (%d of %d entries pruned) does not fit the block's %s at sparsity %g; "
        "drawing a new %s mask from the current weights",
        name,
        pruned,
        given.numel(),
        group.structure_label,
        group.sparsity,
        group.init_method,
    )
    return make_mask(name, param, group)


def _structure_fits(mask: torch.Tensor, group: GroupSettings) -> bool:
    if group.structure != "block":
        return True
    from sparsetrain.kernels.blocks import is_block_structured
    from sparsetrain.sparsity.masks import settings_block

    return is_block_structured(mask, settings_block(group))


def warn_from_zeros(masks: Mapping[str, torch.Tensor], settings: Mapping[str, GroupSettings]) -> None:
    """One warning when ``from_zeros`` masks are far from the block's stated sparsity."""
    off = []
    for name, mask in masks.items():
        group = settings[name]
        if group.init_method == "from_zeros" and mask.numel():
            found = 1.0 - int(mask.sum().item()) / mask.numel()
            if abs(found - group.sparsity) > 0.01:
                off.append(f"{name} {found:.1%}")
    if off:
        log.warning(
            "sparsity: from_zeros found other fractions of zeros than the block's sparsity in "
            "%d tensor(s) (the masks follow the weights): %s",
            len(off),
            ", ".join(off[:5]) + (", ..." if len(off) > 5 else ""),
        )
