"""Storage helpers of :mod:`sparsetrain.sparsity.block_linear`: moving stored live blocks to a new
layout (in place where the count is unchanged, so tensors keep their addresses for CUDA graphs),
the kernel tables as module buffers, and renaming a module's parameter in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsetrain.kernels.block_sparse_op import TABLES
from sparsetrain.kernels.blocks import BlockLayout, pack_blocks, unpack_blocks


def block_mover(old: BlockLayout, new: BlockLayout) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function taking a tensor of ``old``'s blocks ``(old.nnz, br, bc)`` to ``new``'s: blocks
    live in both keep their values, new ones are 0. A gather of the blocks (no dense tensor);
    through dense where the block size changes."""
    if old.block != new.block or old.shape != new.shape:
        return lambda t: pack_blocks(unpack_blocks(t, old), new)
    rows, cols = new.grid
    ids = torch.full((rows, cols), -1, dtype=torch.long, device=new.row_cols.device)
    ids[old.blk_rows.long(), old.row_cols.long()] = torch.arange(old.nnz, device=ids.device)
    source = ids[new.blk_rows.long(), new.row_cols.long()]  # each new block's old id, or -1
    kept = source >= 0

    def move(t: torch.Tensor) -> torch.Tensor:
        moved = t.new_zeros((new.nnz, *t.shape[1:]))
        moved[kept] = t[source[kept]]
        return moved

    return move


def replace_into(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` written into ``tensor`` (returned) when the shapes agree, else ``value``."""
    if value.shape != tensor.shape:
        return value
    return tensor.copy_(value)


def set_tables(module: nn.Module, prefix: str, tables: BlockLayout) -> None:
    """The tables as non-persistent buffers ``<prefix><name>``: copied into the buffers already
    there where shape, dtype and device agree (fixed addresses for CUDA graphs), else new."""
    for name in TABLES:
        value, current = getattr(tables, name), module._buffers.get(f"{prefix}{name}")
        kind = (value.shape, value.dtype, value.device)
        if current is not None and (current.shape, current.dtype, current.device) == kind:
            current.copy_(value)
        else:
            module.register_buffer(f"{prefix}{name}", value, persistent=False)


def drop_tables(module: nn.Module, prefix: str) -> None:
    for name in TABLES:
        if hasattr(module, f"{prefix}{name}"):
            delattr(module, f"{prefix}{name}")


def rename_parameter(module: nn.Module, old: str, new: str, value: nn.Parameter) -> None:
    """Replace parameter ``old`` by ``new`` at the same place in the module's order, so that
    parameter lists (optimizer groups, state_dict keys) keep their order."""
    params = list(module._parameters.items())
    module._parameters.clear()
    for key, p in params:
        module._parameters[new if key == old else key] = value if key == old else p
