"""Block geometry of a weight: its block grid, live-block layouts, the kernels' index tables and
packing of live blocks. Pure torch (no Triton), so the CPU tests cover it.

**Grid.** A weight is viewed as a matrix ``(shape[0], numel / shape[0])`` (a 1-D tensor as one
row) and cut into ``(rows, cols)`` blocks from the top-left corner; the last block row and column
are partial when a dimension is not a multiple of the block size. A ``layout`` is a bool tensor of
the grid's shape, True where a block is live (keeps any entry); ``layout_to_mask`` expands it to
an entry mask, ``block_layout`` reads it off a mask.

**Tables.** A weight ``W`` of shape ``(N, K)`` cut into whole ``(br, bc)`` blocks has a layout of
shape ``(N / br, K / bc)``. Live blocks are numbered ``0 .. nnz-1`` in row-major order of the
layout; that is the order of the packed weight ``Wp`` of shape ``(nnz, br, bc)``. The tables, all
int32 on the weight's device:

    row_ptr   [N/br + 1]  live blocks of block-row n are ids row_ptr[n] .. row_ptr[n+1]-1
    row_cols  [nnz]       block-column of each id                      (forward: Y = X W^T)
    col_ptr   [K/bc + 1]  entries col_ptr[k] .. col_ptr[k+1]-1 of the column lists
    col_rows  [nnz]       block-row of each entry, in column-major order  (input grad: dX = dY W)
    col_ids   [nnz]       packed id of each entry, in column-major order
    blk_rows  [nnz]       block-row of each id                         (weight grad on live blocks)

They are built once per mask (``BlockLayout.build``) and cached by the caller: masks change only
when a run starts or resumes, never per step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BlockLayout",
    "BlockSize",
    "as_block",
    "block_grid",
    "block_layout",
    "blocked",
    "is_block_structured",
    "kernel_block_ok",
    "layout_to_mask",
    "matrix_shape",
    "pack_blocks",
    "unpack_blocks",
    "write_blocks",
]

BlockSize = int | Sequence[int]

# -- the block grid of any weight ------------------------------------------------------------------


def as_block(block: BlockSize) -> tuple[int, int]:
    """``(rows, cols)`` of a block size given as an int (square) or a pair of positive ints."""
    if isinstance(block, numbers.Integral):
        block = (block, block)
    rows, cols = (int(b) for b in block)
    if rows < 1 or cols < 1:
        raise ValueError(f"block size must be positive, got {(rows, cols)}")
    return rows, cols


def matrix_shape(shape: torch.Size | Sequence[int]) -> tuple[int, int]:
    """The matrix a weight is cut into blocks as: ``(shape[0], rest)``; a 1-D tensor is one row."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def block_grid(shape: torch.Size | Sequence[int], block: BlockSize) -> tuple[int, int]:
    """Number of block rows and block columns, partial edge blocks included."""
    rows, cols = matrix_shape(shape)
    br, bc = as_block(block)
    return -(-rows // br), -(-cols // bc)


def layout_to_mask(layout: torch.Tensor, block: BlockSize, shape: torch.Size | Sequence[int]) -> torch.Tensor:
    """Expand a ``(block_rows, block_cols)`` bool layout to an entry mask of ``shape``."""
    br, bc = as_block(block)
    rows, cols = matrix_shape(shape)
    if tuple(layout.shape) != block_grid(shape, (br, bc)):
        raise ValueError(
            f"layout of shape {tuple(layout.shape)} does not fit a {tuple(shape)} weight in {br}x{bc} "
            f"blocks (expected {block_grid(shape, (br, bc))})"
        )
    mask = layout.to(torch.bool).repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    return mask[:rows, :cols].reshape(shape)


def blocked(tensor: torch.Tensor, block: tuple[int, int], fill) -> torch.Tensor:
    """``tensor`` as a matrix padded with ``fill`` to whole blocks, viewed ``(R, br, C, bc)``."""
    br, bc = block
    rows, cols = matrix_shape(tensor.shape)
    grid_rows, grid_cols = block_grid(tensor.shape, block)
    matrix = tensor.reshape(rows, cols)
    matrix = F.pad(matrix, (0, grid_cols * bc - cols, 0, grid_rows * br - rows), value=fill)
    return matrix.reshape(grid_rows, br, grid_cols, bc)


def block_layout(mask: torch.Tensor, block: BlockSize) -> torch.Tensor:
    """Bool ``(block_rows, block_cols)``: True where the block keeps any entry (a live block)."""
    blocks = blocked(mask.detach().to(torch.uint8), as_block(block), 0)
    return blocks.amax(dim=(1, 3)).to(torch.bool)


def is_block_structured(mask: torch.Tensor, block: BlockSize) -> bool:
    """Whether every block of ``mask`` is wholly kept or wholly pruned."""
    block = as_block(block)
    return torch.equal(layout_to_mask(block_layout(mask, block), block, mask.shape), mask.to(torch.bool))


# -- the kernels' tables and packed blocks ---------------------------------------------------------


# Block sides the Triton kernels take: tensor-core tiles need powers of two of at least 16.
KERNEL_BLOCK_SIDES = (16, 32, 64, 128, 256)


def kernel_block_ok(shape: tuple[int, int], block: tuple[int, int]) -> bool:
    """Whether a ``shape`` weight in ``block`` tiles can run on the kernels: whole blocks only
    (no partial edge block) and block sides in ``KERNEL_BLOCK_SIDES``."""
    (n, k), (br, bc) = shape, block
    return br in KERNEL_BLOCK_SIDES and bc in KERNEL_BLOCK_SIDES and n % br == 0 and k % bc == 0


@dataclass(frozen=True)
class BlockLayout:
    shape: tuple[int, int]
    block: tuple[int, int]
    nnz: int
    row_ptr: torch.Tensor
    row_cols: torch.Tensor
    col_ptr: torch.Tensor
    col_rows: torch.Tensor
    col_ids: torch.Tensor
    blk_rows: torch.Tensor

    @classmethod
    def build(cls, layout: torch.Tensor, block: tuple[int, int]) -> BlockLayout:
        layout = layout.to(torch.bool)
        grid_rows, grid_cols = layout.shape
        br, bc = block
        device = layout.device
        rows, cols = layout.nonzero(as_tuple=True)  # row-major: the packed order
        nnz = int(rows.numel())
        ids = torch.arange(nnz, device=device)
        by_col = torch.argsort(cols * grid_rows + rows)  # column-major order of the same blocks
        row_counts = layout.sum(dim=1)
        col_counts = layout.sum(dim=0)

        def ptr(counts: torch.Tensor) -> torch.Tensor:
            return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)

        i32 = torch.int32
        return cls(
            shape=(grid_rows * br, grid_cols * bc),
            block=(br, bc),
            nnz=nnz,
            row_ptr=ptr(row_counts),
            row_cols=cols.to(i32),
            col_ptr=ptr(col_counts),
            col_rows=rows[by_col].to(i32),
            col_ids=ids[by_col].to(i32),
            blk_rows=rows.to(i32),
        )

    def to(self, device: torch.device) -> BlockLayout:
        moved = {
            name: getattr(self, name).to(device)
            for name in ("row_ptr", "row_cols", "col_ptr", "col_rows", "col_ids", "blk_rows")
        }
        return BlockLayout(self.shape, self.block, self.nnz, **moved)

    @property
    def grid(self) -> tuple[int, int]:
        return self.shape[0] // self.block[0], self.shape[1] // self.block[1]

    def density(self) -> float:
        rows, cols = self.grid
        return self.nnz / max(rows * cols, 1)


def _blocks_view(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``(N/br, K/bc, br, bc)`` view of a contiguous ``(N, K)`` weight."""
    (n, k), (br, bc) = weight.shape, block
    return weight.view(n // br, br, k // bc, bc).transpose(1, 2)


def pack_blocks(weight: torch.Tensor, layout: BlockLayout, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The live blocks of ``weight`` as a contiguous ``(nnz, br, bc)`` tensor in ``dtype``."""
    blocks = _blocks_view(weight.contiguous(), layout.block)
    cols = layout.row_cols.long()
    packed = blocks[layout.blk_rows.long(), cols]  # advanced indexing: a copy of the live blocks only
    return packed if dtype is None else packed.to(dtype)


def unpack_blocks(packed: torch.Tensor, layout: BlockLayout, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense ``(N, K)`` tensor holding ``packed``'s blocks at their places, zeros elsewhere."""
    dense = packed.new_zeros(layout.shape, dtype=dtype or packed.dtype)
    write_blocks(dense, packed, layout)
    return dense


def write_blocks(dense: torch.Tensor, packed: torch.Tensor, layout: BlockLayout) -> None:
    """Write ``packed``'s blocks into the contiguous ``(N, K)`` tensor ``dense`` at their places."""
    _blocks_view(dense, layout.block)[layout.blk_rows.long(), layout.row_cols.long()] = packed.to(dense.dtype)
