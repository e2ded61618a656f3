"""Sparse checkpoints for library users, outside the CLI: a model (and optimizer) saved in the
NaN format of :mod:`sparsetrain.sparsity.nan_format`, and loaded back with its masks (or dense).

    sparsetrain.save_sparse_checkpoint("ckpt.mdl", model, sparsifier, optimizer, global_step=step)
    sparsifier = sparsetrain.load_sparse_checkpoint("ckpt.mdl", model, optimizer, block={"sparsity": 0.75})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain.sparsity import nan_format
from sparsetrain.sparsity.sparsifier import sparsify


def save_sparse_checkpoint(
    path: Path, model: torch.nn.Module, sparsifier: Any = None,
    optimizer: torch.optim.Optimizer | None = None, **extra: Any,
) -> None:
    """Write ``model`` (and ``optimizer``) in the NaN format, for use outside the sparsetrain CLI.

    Pruned positions of every sparsified weight, and of its same-shape optimizer state, become
    NaN. ``extra`` entries (``global_step``, ...) are stored beside ``model`` and ``optimizer``.
    """
    masks = sparsifier.masks if sparsifier is not None else {}
    state: dict[str, Any] = {"global_step": 0, "writer": "sparsetrain", **extra}
    state["model"] = nan_format.encode_state_dict(model.state_dict(), masks)
    if optimizer is not None:
        state["optimizer"] = nan_format.encode_optimizer_state(optimizer.state_dict(), optimizer, model, masks)
    ckpt.save_checkpoint(state, path)


def load_sparse_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
    block: Any = None,
) -> Any:
    """Load a NaN-format checkpoint into ``model`` (and ``optimizer``); returns a Sparsifier or None.

    With ``block`` (a ``sparsity:`` mapping) the stored masks are kept and enforced from now on;
    without one the NaNs become zeros and every weight trains (dense fine-tuning).
    """
    state = ckpt.load_checkpoint(path)
    model_sd = state["model"]
    ckpt.check_model_state(model_sd, model.state_dict(), path)
    clean, masks = nan_format.decode_state_dict(model_sd)
    model.load_state_dict(clean)
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(nan_format.decode_optimizer_state(state["optimizer"]))
    if block is None:
        return None
    device = next(model.parameters()).device
    return sparsify(model, block, optimizer, masks={k: v.to(device) for k, v in masks.items()})
