"""The learning-rate schedule: a constant, or the zoo's phases run one after another.

The schedule sets absolute values through ``LambdaLR`` on a base learning rate of 1.0 (see
:func:`sparsetrain.optim.build.build_optimizer`).
"""

from __future__ import annotations

import math

import torch


def lr_at(lr: float | list, step: int, max_steps: int) -> float:
    """The learning rate at ``step``: a constant, or phases run one after another (zoo style)."""
    if not isinstance(lr, list):
        return float(lr)
    start = 0
    for i, phase in enumerate(lr):
        total = phase.get("total_iters") or max(max_steps - start, 1)
        lo, hi = phase["initial_learning_rate"], phase.get("end_learning_rate", phase["initial_learning_rate"])
        t = step - start
        if t < total or i == len(lr) - 1:
            frac = min(max(t, 0) / total, 1.0)
            if phase["scheduler"] == "Constant":
                return lo
            if phase["scheduler"] == "Linear":
                return lo + (hi - lo) * frac
            return hi + (lo - hi) * 0.5 * (1.0 + math.cos(math.pi * frac))
        start += total
    raise AssertionError("unreachable")


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: float | list, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``optimizer``'s scheduler for ``optimizer.learning_rate`` (its base lr must be 1.0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(schedule, s, max_steps))
