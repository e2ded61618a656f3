"""``block_sparse_linear``: a linear layer over the live blocks of its weight, as one torch op.

The Triton kernels (:mod:`sparsetrain.kernels.block_sparse`) are wrapped in the torch op
``sparsetrain::block_sparse_mm`` with its autograd formula and fake (meta) implementation, so that
``torch.compile`` keeps it whole (no graph break) and CUDA graphs can capture it. Importing this
module does not import Triton; the kernels load on the first call on a GPU.

The weight comes in one of two storages (``sparsity.block_linear`` picks): the dense ``(N, K)``
master with zeros at pruned blocks, or its live blocks only, ``(nnz, br, bc)`` in the tables'
block order (``BlockLayout``). Its gradient has the weight's own shape: dense, exactly 0 at dead
blocks, or packed like the weight.

Dtypes follow ``F.linear`` under autocast: with CUDA autocast on, the input is cast to the
autocast dtype and the fp32 master weight is read as that dtype (only its live blocks are
copied, once per call: packed from the dense weight by a kernel, or a plain cast of the stored
blocks); the weight gradient comes back in the weight's own dtype (fp32). The kernels run in bf16
or fp16. Everything else, an fp32 model, a CPU tensor, a block shape the kernels do not take (see
``kernel_block_ok``) or no Triton, takes the fallback ``F.linear``: on the dense weight itself (the
sparsifier keeps pruned weights at exactly zero, so both paths compute the same function: the
kernels just skip the zero blocks), or on the stored blocks unpacked to dense, differentiably.

On Hopper the kernels load tiles through TMA descriptors; ``SPARSETRAIN_BLOCK_TMA=0`` in the
environment makes them use pointer loads instead (for comparison; TMA is the faster).
``SPARSETRAIN_BLOCK_KERNEL=gluon`` runs the forward and input gradient on the Gluon ping-pong
kernels (``kernels.gluon_block_sparse``; sm_90, 128x128 blocks, else the Triton ones): they are
correct but measured no faster than the Triton kernels (benchmarks/NOTES_block_kernels.md), so
the default (``auto``, or ``triton``) stays on Triton.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from sparsetrain.kernels import has_triton
from sparsetrain.kernels.blocks import BlockLayout, kernel_block_ok

__all__ = ["TABLES", "block_sparse_linear", "dense_from_blocks", "kernel_path", "layout_of", "triton_ready"]

# The BlockLayout tables the op takes, in this order.
TABLES = ("row_ptr", "row_cols", "col_ptr", "col_rows", "col_ids", "blk_rows")
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def layout_of(shape: tuple[int, int], tables: list[torch.Tensor], block: tuple[int, int]) -> BlockLayout:
    """The :class:`BlockLayout` of a ``shape`` weight from its tables (in ``TABLES`` order)."""
    return BlockLayout(tuple(shape), tuple(block), tables[1].numel(), *tables)


def _out_features(weight: torch.Tensor, tables: list[torch.Tensor], br: int) -> int:
    """N: a dense weight's rows, or for live blocks ``(nnz, br, bc)`` the block-rows of the
    tables (``row_ptr`` has one entry per block-row, plus one) times ``br``."""
    return weight.shape[0] if weight.dim() == 2 else (tables[0].shape[0] - 1) * br


def dense_from_blocks(
    blocks: torch.Tensor, tables: list[torch.Tensor], block: tuple[int, int], in_features: int
) -> torch.Tensor:
    """The ``(N, K)`` weight of live ``blocks`` (zeros at dead blocks), differentiable in
    ``blocks`` (an ``index_copy``, whose gradient gathers the live blocks back): the fallback's
    weight, and what torch.compile can trace."""
    (br, bc), cols = block, in_features // block[1]
    rows = tables[0].shape[0] - 1
    place = tables[5].long() * cols + tables[1].long()  # blk_rows, row_cols: each block's grid cell
    grid = blocks.new_zeros(rows * cols, br, bc).index_copy(0, place, blocks)
    return grid.view(rows, cols, br, bc).transpose(1, 2).reshape(rows * br, cols * bc)


def _use_tma(*tensors: torch.Tensor) -> bool:
    from sparsetrain.kernels.block_sparse import tma_available

    if os.environ.get("SPARSETRAIN_BLOCK_TMA", "1") == "0":
        return False
    return tma_available(tensors[0].device) and all(t.data_ptr() % 16 == 0 for t in tensors)


@functools.cache
def _gluon_device(index: int) -> bool:
    """sm_90 (the kernels use wgmma and setmaxnreg) and a Triton with Gluon."""
    if torch.cuda.get_device_capability(index) != (9, 0):
        return False
    try:
        from sparsetrain.kernels import gluon_block_sparse  # noqa: F401
    except ImportError:
        return False
    return True


def _gluon(block: tuple[int, int], *tensors: torch.Tensor):
    """The Gluon kernel module when it is asked for and takes this call (module docstring)."""
    if os.environ.get("SPARSETRAIN_BLOCK_KERNEL", "auto") != "gluon":
        return None
    if not _use_tma(*tensors) or not _gluon_device(tensors[0].device.index or 0):
        return None
    from sparsetrain.kernels import gluon_block_sparse

    return gluon_block_sparse if gluon_block_sparse.gluon_ok(block, tensors[0].dtype) else None


# The two ops are defined through ``torch.library.Library`` rather than ``torch.library.custom_op``:
# the latter wraps every call in Python layers of its own (device dispatch, an aliasing check),
# which is host time per layer in every step that does not replay CUDA graphs (compiled without
# graphs: DDP, FSDP). Their outputs are fresh tensors (never an input or a view of one).
_LIB = torch.library.Library("sparsetrain", "FRAGMENT")  # lives as long as the process
_LIB.define("block_sparse_mm(Tensor x, Tensor weight, Tensor[] tables, int br, int bc) -> (Tensor, Tensor)")
_LIB.define(
    "block_sparse_mm_backward(Tensor dy, Tensor x, Tensor packed, Tensor[] tables, int n, int br, int bc, "
    "ScalarType weight_dtype, bool block_weight, bool need_input, bool need_weight) -> (Tensor, Tensor)"
)


def _mm_entry(x, weight, tables, br, bc):
    """``(x @ W.T, packed)`` over the live blocks; ``x (M, K)`` in the compute dtype, ``weight``
    the dense ``(N, K)`` W or its live blocks ``(nnz, br, bc)``. ``packed``, the live blocks in
    the compute dtype, is kept for the backward (as autocast keeps its cast copy of a dense weight)."""
    return _forward_impl(x, weight, tables, br, bc)


def _mm_backward_entry(dy, x, packed, tables, n, br, bc, weight_dtype, block_weight, need_input, need_weight):
    """``(dX, dW)`` with ``dW`` in ``weight_dtype``: dense ``(n, K)``, or with ``block_weight``
    (the weight is stored as live blocks) packed ``(nnz, br, bc)``; one not asked for is empty."""
    return _backward_impl(dy, x, packed, tables, n, br, bc, weight_dtype, block_weight, need_input, need_weight)


# The entries above look the implementations up at call time (tests put torch products there).
for _key in ("CUDA", "CPU"):
    _LIB.impl("block_sparse_mm", _mm_entry, _key)
    _LIB.impl("block_sparse_mm_backward", _mm_backward_entry, _key)
block_sparse_mm = torch.ops.sparsetrain.block_sparse_mm.default
block_sparse_mm_backward = torch.ops.sparsetrain.block_sparse_mm_backward.default


def _forward_impl(x, weight, tables, br, bc):
    from sparsetrain.kernels import block_sparse

    layout = layout_of((_out_features(weight, tables, br), x.shape[1]), tables, (br, bc))
    if weight.dim() == 3:  # stored as live blocks: a cast (a copy: an op output never aliases its input)
        packed = weight.to(x.dtype, copy=True)
    else:
        packed = block_sparse.pack(weight, layout, x.dtype)
    gluon = _gluon((br, bc), x, packed)
    if gluon is not None:
        return gluon.forward(x, packed, layout), packed
    return block_sparse.forward(x, packed, layout, use_tma=_use_tma(x, packed)), packed


@torch.library.register_fake("sparsetrain::block_sparse_mm")
def _(x, weight, tables, br, bc):
    nnz = tables[1].shape[0]
    return x.new_empty(x.shape[0], _out_features(weight, tables, br)), x.new_empty(nnz, br, bc)


def _backward_impl(dy, x, packed, tables, n, br, bc, weight_dtype, block_weight, need_input, need_weight):
    from sparsetrain.kernels import block_sparse

    layout = layout_of((n, x.shape[1]), tables, (br, bc))
    dy = dy.to(x.dtype)
    dx, dw = x.new_empty(0), x.new_empty(0)  # two tensors: an op's outputs never alias each other
    if need_input:
        gluon = _gluon((br, bc), dy, packed)
        if gluon is not None:
            dx = gluon.dgrad(dy, packed, layout)
        else:
            dx = block_sparse.dgrad(dy, packed, layout, use_tma=_use_tma(dy, packed))
    if need_weight:
        dw = block_sparse.wgrad(
            x, dy, layout, out_dtype=weight_dtype, use_tma=_use_tma(x, dy), packed=block_weight
        )
    return dx, dw


@torch.library.register_fake("sparsetrain::block_sparse_mm_backward")
def _(dy, x, packed, tables, n, br, bc, weight_dtype, block_weight, need_input, need_weight):
    dx = x.new_empty(x.shape) if need_input else x.new_empty(0)
    shape = (tables[1].shape[0], br, bc) if block_weight else (n, x.shape[1])
    dw = x.new_empty(shape, dtype=weight_dtype) if need_weight else x.new_empty(0)
    return dx, dw


def _meta(weight: torch.Tensor, tables, br: int, bc: int) -> tuple:
    """What the backward needs of the weight: (N, br, bc, its dtype, stored as live blocks?)."""
    return (_out_features(weight, tables, br), br, bc, weight.dtype, weight.dim() == 3)


def _setup_context(ctx, inputs, output):
    x, weight, tables, br, bc = inputs
    ctx.meta = _meta(weight, tables, br, bc)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], *tables)


_NO_DOUBLE_BACKWARD = (
    "sparsetrain::block_sparse_mm: its gradient has no gradient of its own (create_graph=True, "
    "e.g. a gradient penalty, is not supported on the block-sparse kernels); run those layers "
    "masked dense (runconfig.sparse_kernels: off)"
)


def _backward(ctx, dy, _packed_grad):
    if torch.is_grad_enabled():  # only under create_graph=True: the products below are not differentiable
        raise NotImplementedError(_NO_DOUBLE_BACKWARD)
    x, packed, *tables = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    no_tables = [None] * len(tables)
    if not (need_input or need_weight):
        return None, None, no_tables, None, None
    dx, dw = block_sparse_mm_backward(dy, x, packed, tables, *ctx.meta, need_input, need_weight)
    return (dx if need_input else None), (dw if need_weight else None), no_tables, None, None


torch.library.register_autograd("sparsetrain::block_sparse_mm", _backward, setup_context=_setup_context)


class _EagerBlockSparseMM(torch.autograd.Function):
    """The same products for eager mode, without the custom op's per-call dispatch and checks
    (they cost more host time than the kernels take on GPT-2-small shapes)."""

    @staticmethod
    def forward(ctx, x, weight, br, bc, *tables):
        y, packed = _forward_impl(x, weight, list(tables), br, bc)
        ctx.meta = _meta(weight, tables, br, bc)
        ctx.save_for_backward(x, packed, *tables)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, packed, *tables = ctx.saved_tensors
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = None
        if need_input or need_weight:
            dx, dw = _backward_impl(dy, x, packed, tables, *ctx.meta, need_input, need_weight)
        return (dx if need_input else None), (dw if need_weight else None), None, None, *([None] * len(tables))


def kernel_path(x: torch.Tensor, weight: torch.Tensor, block: tuple[int, int]) -> torch.dtype | None:
    """The dtype the kernels would run in for this call, or None when it takes the fallback.
    Live blocks ``(nnz, br, bc)`` are stored only for shapes the kernels take (checked then)."""
    if not (x.is_cuda and weight.is_cuda):
        return None
    if weight.dim() == 2 and not kernel_block_ok(tuple(weight.shape), block):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    if dtype not in _KERNEL_DTYPES or not triton_ready():
        return None
    return dtype


_TRITON: list[bool] = []


def triton_ready() -> bool:
    """``has_triton()``, asked once (in eager code: ``BlockSparseLinear.set_layout`` asks first),
    so that torch.compile reads a plain module constant instead of tracing an import."""
    if not _TRITON:
        _TRITON.append(has_triton())
    return _TRITON[0]


def block_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tables: list[torch.Tensor],
    block: tuple[int, int],
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` computed over the live blocks only (``tables`` from a
    :class:`BlockLayout` of W's mask, in ``TABLES`` order); the fallback where the kernels do not
    apply. ``weight`` is W dense, ``(N, K)`` with pruned entries at zero (the sparsifier keeps them
    so), or its live blocks ``(nnz, br, bc)``."""
    dtype = kernel_path(x, weight, block)
    if dtype is None:
        if weight.dim() == 3:
            weight = dense_from_blocks(weight, tables, block, x.shape[-1])
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    if torch.compiler.is_compiling():
        y, _ = block_sparse_mm(x2, weight, tables, block[0], block[1])
    else:
        y = _EagerBlockSparseMM.apply(x2, weight, block[0], block[1], *tables)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.reshape(*lead, y.shape[-1])
