"""Optimizers: the one a params file asks for (:mod:`~sparsetrain.optim.build`), its learning-rate
schedule (:mod:`~sparsetrain.optim.schedule`), and :class:`~sparsetrain.optim.packed.PackedOptimizer`
(also ``sparsetrain.PackedOptimizer``), whose state for sparsified weights holds their kept entries
only: a drop-in for ``torch.optim.AdamW`` / ``Adam`` / ``SGD`` in your own loop, once
``sparsetrain.sparsify(model, block, optimizer)`` has handed it the masks.
"""

from sparsetrain.optim.build import build_optimizer
from sparsetrain.optim.packed import PackedOptimizer
from sparsetrain.optim.schedule import lr_at, lr_scheduler

__all__ = ["PackedOptimizer", "build_optimizer", "lr_at", "lr_scheduler"]
