"""Block-sparse linear layer in plain torch: the oracle for the GPU kernels, and the CPU fallback.

A weight ``W`` of shape ``(out_features, in_features)`` is cut into ``block = (br, bc)`` tiles
from the top-left corner (partial edge tiles when a dimension is not a multiple of the block
size; ``sparsetrain.kernels.blocks``). ``layout`` is a bool tensor of shape
``(ceil(out / br), ceil(in / bc))``: True = live block. Entries outside live blocks are never
read (they may hold anything, NaN included), so every result equals the masked dense one with
those entries taken as zero:

    forward        Y  = X W_live^T (+ bias)        block_sparse_linear_reference
    input grad     dX = dY W_live                  block_sparse_linear_grad_input
    weight grad    dW = (dY^T X) on live blocks,   block_sparse_linear_grad_weight
                        exact zeros elsewhere

The ``*_reference`` functions are written to be obviously right rather than fast: one Python loop
over the live blocks, each a small dense product, accumulated in float32 (float64 for float64
inputs) and cast to the inputs' dtype at the end, as a tensor-core kernel with fp32
accumulators would. ``BlockSparseLinearFunction`` wires them into autograd. ``masked_dense`` is
one dense ``F.linear`` on ``where(mask, W, 0)``, whose autograd gives the same three products.
The GPU kernels are :mod:`sparsetrain.kernels.block_sparse`; the entry point training calls is
:func:`sparsetrain.kernels.block_sparse_op.block_sparse_linear` (its fallback is plain
``F.linear``, since the sparsifier keeps pruned weights at exactly zero).

Leading dimensions of ``X`` (batch, sequence) are flattened; inputs may be non-contiguous.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from sparsetrain.kernels.blocks import as_block, block_grid, layout_to_mask

__all__ = [
    "BlockSparseLinearFunction",
    "block_sparse_linear_grad_input",
    "block_sparse_linear_grad_weight",
    "block_sparse_linear_reference",
    "masked_dense",
]


def _accumulator(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (fp32 accumulation of bf16/fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _result(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_layout(out_features: int, in_features: int, layout: torch.Tensor, block: tuple[int, int]) -> None:
    grid = block_grid((out_features, in_features), block)
    if layout.dtype != torch.bool or tuple(layout.shape) != grid:
        raise ValueError(
            f"layout must be a bool tensor of shape {grid} for a {out_features}x{in_features} weight in "
            f"{block[0]}x{block[1]} blocks; got {layout.dtype} {tuple(layout.shape)}"
        )


def _live_blocks(
    layout: torch.Tensor, block: tuple[int, int], out_features: int, in_features: int
) -> Iterator[tuple[slice, slice]]:
    """Row and column slices of the weight for each live block, row-major."""
    br, bc = block
    for i, j in layout.nonzero().tolist():
        yield slice(i * br, min((i + 1) * br, out_features)), slice(j * bc, min((j + 1) * bc, in_features))


def _rows(t: torch.Tensor, features: int, name: str) -> torch.Tensor:
    if t.ndim < 1 or t.shape[-1] != features:
        raise ValueError(f"{name}: last dimension must be {features}, got shape {tuple(t.shape)}")
    return t.reshape(-1, features)


def block_sparse_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    layout: torch.Tensor,
    block: int | Sequence[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Y = X W^T (+ bias)`` reading only the live blocks of ``weight``."""
    block = as_block(block)
    out_features, in_features = weight.shape
    _check_layout(out_features, in_features, layout, block)
    acc = _accumulator(x, weight)
    x2 = _rows(x, in_features, "x").to(acc)
    y = torch.zeros(x2.shape[0], out_features, dtype=acc, device=x.device)
    for r, c in _live_blocks(layout, block, out_features, in_features):
        y[:, r] += x2[:, c] @ weight[r, c].to(acc).T
    if bias is not None:
        y += bias.to(acc)
    return y.to(_result(x, weight)).reshape(*x.shape[:-1], out_features)


def block_sparse_linear_grad_input(
    dy: torch.Tensor, weight: torch.Tensor, layout: torch.Tensor, block: int | Sequence[int]
) -> torch.Tensor:
    """``dX = dY W`` reading only the live blocks of ``weight``."""
    block = as_block(block)
    out_features, in_features = weight.shape
    _check_layout(out_features, in_features, layout, block)
    acc = _accumulator(dy, weight)
    dy2 = _rows(dy, out_features, "dy").to(acc)
    dx = torch.zeros(dy2.shape[0], in_features, dtype=acc, device=dy.device)
    for r, c in _live_blocks(layout, block, out_features, in_features):
        dx[:, c] += dy2[:, r] @ weight[r, c].to(acc)
    return dx.to(_result(dy, weight)).reshape(*dy.shape[:-1], in_features)


def block_sparse_linear_grad_weight(
    x: torch.Tensor, dy: torch.Tensor, layout: torch.Tensor, block: int | Sequence[int]
) -> torch.Tensor:
    """``dW = dY^T X`` on the live blocks, exact zeros elsewhere; shape ``(out, in)``."""
    block = as_block(block)
    out_features, in_features = dy.shape[-1], x.shape[-1]
    _check_layout(out_features, in_features, layout, block)
    acc = _accumulator(x, dy)
    x2 = _rows(x, in_features, "x").to(acc)
    dy2 = _rows(dy, out_features, "dy").to(acc)
    if x2.shape[0] != dy2.shape[0]:
        raise ValueError(f"x has {x2.shape[0]} rows, dy {dy2.shape[0]}")
    dw = torch.zeros(out_features, in_features, dtype=acc, device=x.device)
    for r, c in _live_blocks(layout, block, out_features, in_features):
        dw[r, c] = dy2[:, r].T @ x2[:, c]
    return dw.to(_result(x, dy))


class BlockSparseLinearFunction(torch.autograd.Function):
    """Autograd over the reference products: ``apply(x, weight, layout, block, bias=None)``.

    The weight gradient is zero outside live blocks; the bias gradient is ``dY`` summed over all
    leading dimensions. Gradients come back in the dtype of the tensor they belong to.
    """

    @staticmethod
    def forward(ctx, x, weight, layout, block, bias=None):
        block = as_block(block)
        ctx.block = block
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, layout)
        return block_sparse_linear_reference(x, weight, layout, block, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, layout = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = block_sparse_linear_grad_input(dy, weight, layout, ctx.block).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = block_sparse_linear_grad_weight(x, dy, layout, ctx.block).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            db = dy.reshape(-1, dy.shape[-1]).sum(dim=0)
        return dx, dw, None, None, db


def masked_dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    layout: torch.Tensor,
    block: int | Sequence[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fallback: dense ``F.linear`` on the weight with every entry outside live blocks set to
    zero (``where``, so NaN or junk there never leaks in); autograd masks the weight gradient."""
    block = as_block(block)
    _check_layout(weight.shape[0], weight.shape[1], layout, block)
    mask = layout_to_mask(layout.to(weight.device), block, weight.shape)
    return F.linear(x, torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)), bias)
