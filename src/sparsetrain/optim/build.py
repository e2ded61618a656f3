"""The optimizer a params file's ``optimizer:`` section asks for, with weight decay on matrices only."""

from __future__ import annotations

import torch

from sparsetrain.config.sections import OptimizerParams
from sparsetrain.optim.packed import PackedOptimizer


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerParams, device: torch.device, packed: bool = False
) -> torch.optim.Optimizer:
    """Weight decay on matrices only: not on norms, biases or (unless ``decay_embeddings``, the
    zoo's rule) embeddings, tied head included.

    ``packed``: a :class:`~sparsetrain.optim.packed.PackedOptimizer` of the same kind,
    whose state for sparsified weights (masks handed over by the sparsifier) holds kept entries
    only; its checkpoints have the torch optimizer's layout. Block weights stored as live blocks
    (``weight_blocks``, 3-D) are matrices here too: decayed, and stepped as dense parameters.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and (cfg.decay_embeddings or "embed" not in name) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay_rate},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = {"fused": True} if device.type == "cuda" else {}
    # The schedule sets absolute values through LambdaLR, so the base lr is 1.0.
    if packed:
        kind = cfg.optimizer_type.lower()
        if kind == "sgd":
            return PackedOptimizer(groups, kind="sgd", lr=1.0, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused)
        return PackedOptimizer(groups, kind=kind, lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    if cfg.optimizer_type == "AdamW":
        return torch.optim.AdamW(groups, lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    if cfg.optimizer_type == "Adam":
        return torch.optim.Adam(groups, lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    return torch.optim.SGD(groups, lr=1.0, momentum=cfg.momentum, nesterov=cfg.nesterov)
