"""Static weight sparsity: the ``sparsity:`` block, masks, the sparsifier, NaN checkpoints.

    from sparsetrain.sparsity import sparsify
    sparsifier = sparsify(model, params["sparsity"], optimizer)   # after .to(device) and DDP

See ``config`` for the block, ``masks`` for how masks are chosen, ``sparsifier`` for the
invariant it enforces, and ``nan_format`` for the checkpoint encoding.
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
from sparsetrain.sparsity.select import select_for_model, select_parameters
from sparsetrain.sparsity.sparsifier import Sparsifier, sparsify

__all__ = [
    "GroupSettings",
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
    "random_mask",
    "select_for_model",
    "select_parameters",
    "sparsify",
    "topk_mask",
]
