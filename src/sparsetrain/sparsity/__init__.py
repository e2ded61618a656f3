"""Weight sparsity on any ``nn.Module``: which weights, their masks, the invariant, NaN checkpoints.

    from sparsetrain.sparsity import sparsify
    sparsifier = sparsify(model, {"sparsity": 0.75}, optimizer)   # after .to(device) and DDP

Modules: ``select`` (which parameters a ``sparsity:`` block takes), ``plans`` (that selection
as a printable, inspectable plan, before any mask is drawn), ``masks`` (pure functions:
tensor + settings -> mask), ``initial_masks`` (stored masks kept or drawn anew), ``sparsifier``
(binds masks and enforces the invariant), ``nan_format`` (the checkpoint encoding),
``checkpoints`` (the library's save / load) and ``block_linear`` (layers on the block-sparse
kernels). The block itself is parsed by :mod:`sparsetrain.config.sparsity`.
"""

from sparsetrain.config.sparsity import GroupSettings, SparsityConfig, parse_sparsity
from sparsetrain.sparsity.masks import (
    from_zeros_mask,
    make_mask,
    mask_from_nan,
    num_pruned,
    random_mask,
    topk_mask,
)
from sparsetrain.sparsity.nan_format import (
    decode_optimizer_state,
    decode_state_dict,
    densify,
    encode_optimizer_state,
    encode_state_dict,
)
from sparsetrain.sparsity.plans import Plan, PlanEntry, plan
from sparsetrain.sparsity.select import select_for_model, select_parameters
from sparsetrain.sparsity.sparsifier import Sparsifier, sparsify

__all__ = [
    "GroupSettings",
    "Plan",
    "PlanEntry",
    "Sparsifier",
    "SparsityConfig",
    "decode_optimizer_state",
    "decode_state_dict",
    "densify",
    "encode_optimizer_state",
    "encode_state_dict",
    "from_zeros_mask",
    "make_mask",
    "mask_from_nan",
    "num_pruned",
    "parse_sparsity",
    "plan",
    "random_mask",
    "select_for_model",
    "select_parameters",
    "sparsify",
    "topk_mask",
]
