"""A Hugging Face GPT-2 directory on disk as a checkpoint of ours, for ``model.init_from: hf:DIR``.

:func:`read_hf_dir` gives what :func:`sparsetrain.checkpoint.load_checkpoint` gives for a file of
ours: ``{"model": state dict in our names, "global_step": ...}``, so the warm start's whole path
(masks kept or drawn, dense fine-tuning without a ``sparsity:`` block) is the same. The weights
come from ``model.safetensors`` (or its sharded index) or ``pytorch_model.bin`` (read with
``weights_only``). A directory ``sparsetrain export`` wrote also gives back its masks
(``sparsity_masks.safetensors``: the pruned positions become NaN again, as in our checkpoints),
its step, and unscaled queries (its ``query_scale`` divided out). A plain GPT-2 is dense: a
``sparsity:`` block then draws its masks from these weights (``init_method`` topk by default:
sparse training from dense weights).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sparsetrain.config.hf_model import exported_info
from sparsetrain.errors import CheckpointError
from sparsetrain.hf.names import from_hf, masks_from_hf, scale_queries

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
MASKS_FILE = "sparsity_masks.safetensors"


def read_hf_dir(path: Path, keys: Iterable[str]) -> dict[str, Any]:
    """Directory ``path`` as a checkpoint of a model whose state dict has ``keys`` (see the module
    docstring); problems are one :class:`CheckpointError` line naming the file."""
    path = Path(path)
    info = exported_info(path) or {}
    hf = _weights(path)
    hf = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in hf.items()}
    scale = float(info.get("query_scale", 1.0) or 1.0)
    if scale != 1.0:
        hf = scale_queries(hf, 1.0 / scale)
    keys = list(keys)
    try:
        model = from_hf({k: v.float() if v.is_floating_point() else v for k, v in hf.items()}, keys)
        masks = _masks(path, info, keys)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for name, mask in masks.items():
        if name not in model or model[name].shape != mask.shape:
            raise CheckpointError(f"{path / MASKS_FILE}: the mask of {name} does not fit its weight")
        model[name] = model[name].masked_fill(~mask, float("nan"))
    return {"model": model, "global_step": int(info.get("global_step", 0) or 0), "hf_dir": str(path)}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    found = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if found is None:
        raise CheckpointError(f"{path}: no weights ({', '.join(WEIGHT_FILES)}); save the model with save_pretrained")
    try:
        if found.name == "pytorch_model.bin":
            return torch.load(found, map_location="cpu", weights_only=True)
        if found.name.endswith(".index.json"):
            shards = sorted(set(json.loads(found.read_text(encoding="utf-8"))["weight_map"].values()))
            return {k: v for shard in shards for k, v in _safetensors(path / shard).items()}
        return _safetensors(found)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors / torch raise their own types for truncated or foreign files
        raise CheckpointError(f"{found}: cannot read it ({type(e).__name__}: {e})") from None


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _masks(path: Path, info: dict[str, Any], keys: list[str]) -> dict[str, torch.Tensor]:
    """Our masks from an export's masks file, in our names (True = kept); none for other directories."""
    if not info or not (path / MASKS_FILE).is_file():
        return {}
    masks = masks_from_hf(_safetensors(path / MASKS_FILE))
    if masks.keys() - set(keys):
        raise ValueError(f"{MASKS_FILE}: a mask of {sorted(masks.keys() - set(keys))[0]!r}, which the model lacks")
    return masks
