"""The reference's sparse checkpoint encoding: NaN at every pruned position.

A sparse checkpoint stores NaN at each pruned entry of a sparsified weight and of every optimizer
state tensor of that weight's shape (the reference hardware skips NaNs). In memory pruned weights
are zeros instead (NaN would poison GPU matmuls), so checkpoint code encodes on save and decodes on
load:

    model_sd = encode_state_dict(model.state_dict(), sparsifier.masks)
    opt_sd = encode_optimizer_state(optimizer.state_dict(), optimizer, model, sparsifier.masks)
    ...
    model_sd, masks = decode_state_dict(loaded_model_sd)      # masks recovered from the NaNs
    opt_sd = decode_optimizer_state(loaded_opt_sd)
    sparsify(model, block, optimizer, masks=masks)            # resume: same masks

``densify`` turns every NaN into 0: dense fine-tuning and ``finalize``. A tensor that holds NaN at
positions its mask keeps (a diverged run) cannot be told apart from a pruned one after decoding;
encoding warns about it. Functions here are pure: they never mutate their inputs and do no I/O.

Layers that store their live blocks only (``sparsity.block_linear``) give the dense weight, and
dense-layout optimizer state, in their state dicts; their optimizer state is found under the
dense weight's name, so such a run writes the same checkpoint as a masked-dense one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsetrain.sparsity.block_linear import state_dict_names
from sparsetrain.sparsity.masks import mask_from_nan
from sparsetrain.tensor_tree import map_tensors

log = logging.getLogger(__name__)


def encode_state_dict(state: Mapping[str, Any], masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A copy of ``state`` with NaN at the pruned positions of every masked tensor."""
    out = dict(state)
    for name, mask in masks.items():
        if name not in state:
            raise KeyError(f"sparsity mask for {name!r} has no tensor of that name in the state dict")
        out[name] = _encode(state[name], mask, name)
    return out


def encode_optimizer_state(
    opt_state_dict: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """A copy of ``optimizer.state_dict()`` with NaN at pruned positions of every state tensor of
    its parameter's shape. Indices are mapped to names through ``optimizer.param_groups``."""
    index_to_name = _index_to_name(opt_state_dict, optimizer, model)
    state = {}
    for index, entry in opt_state_dict["state"].items():
        name = index_to_name.get(index)
        mask = masks.get(name) if name is not None else None
        if mask is None:
            state[index] = entry
            continue
        state[index] = {
            key: _encode(value, mask, f"{name} ({key})")
            if isinstance(value, torch.Tensor) and value.shape == mask.shape and value.is_floating_point()
            else value
            for key, value in entry.items()
        }
    return {**opt_state_dict, "state": state}


def decode_state_dict(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """NaN -> 0, and the mask of every tensor that held NaN (True = kept)."""
    clean, masks = {}, {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and torch.isnan(value).any():
            masks[name] = mask_from_nan(value)
            clean[name] = value.masked_fill(~masks[name], 0)
        else:
            clean[name] = value
    return clean, masks


def decode_optimizer_state(opt_state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an optimizer state dict with NaN -> 0 in every state tensor."""
    return {**opt_state_dict, "state": densify(opt_state_dict["state"])}


def densify(state: Any) -> Any:
    """NaN -> 0 in every floating tensor of a (possibly nested) dict / list / tuple; a copy."""
    return map_tensors(_nan_to_zero, state)


def _nan_to_zero(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and torch.isnan(tensor).any():
        return tensor.masked_fill(torch.isnan(tensor), 0)
    return tensor


def _encode(tensor: Any, mask: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"sparsity mask for {name!r}: NaN encoding needs a floating tensor")
    if tensor.shape != mask.shape:
        raise ValueError(f"sparsity mask for {name!r}: shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}")
    kept = mask.to(device=tensor.device, dtype=torch.bool)
    if torch.isnan(tensor).logical_and(kept).any():
        log.warning("%s holds NaN at kept positions; they will read back as pruned", name)
    return tensor.detach().masked_fill(~kept, float("nan"))


def _index_to_name(opt_state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module):
    """Optimizer state-dict index -> parameter name, as in ``model.state_dict()`` (the first name
    under ``named_parameters``; a ``weight_blocks`` goes by its dense weight's name)."""
    name_of = state_dict_names(model)
    saved_groups = opt_state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, optimizer.param_groups, strict=True)
    ):
        raise ValueError("optimizer state dict does not match the optimizer's parameter groups")
    return {
        index: name_of.get(id(p))
        for saved, group in zip(saved_groups, optimizer.param_groups, strict=True)
        for index, p in zip(saved["params"], group["params"], strict=True)
    }
