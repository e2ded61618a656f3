"""Triton kernels for a linear layer whose weight is block-sparse: the three products of training.

Imported only when :func:`sparsetrain.kernels.has_triton` is true (this module imports Triton).
Shapes: ``X (M, K)``, ``W (N, K)`` in ``(br, bc)`` blocks with tables from
:class:`~sparsetrain.kernels.blocks.BlockLayout`, live blocks packed as ``Wp (nnz, br, bc)``
in the compute dtype (bf16 or fp16):

    forward      Y  (M, N)  = X Wp^T    one program per (M tile, block-row of W): a flat loop over
                                        the live blocks of that block-row (ids row_ptr[n]..), each
                                        in bc/BK steps of BK columns
    input grad   dX (M, K)  = dY Wp     one program per (M tile, block-column of W): a flat loop
                                        over that column's live blocks (col_ptr / col_rows /
                                        col_ids), each in br/BK steps
    weight grad  dW (N, K)  = dY^T X    one program per (live block, slice of M): a loop over
                 live blocks only       M in BK-row steps; with S > 1 slices the partial sums go to
                                        an (S, nnz, br, bc) buffer summed afterwards (deterministic,
                                        no atomics); dead blocks of dW stay exactly 0

Every output tile is written, also where a block-row or block-column has no live block (zeros).
Accumulation is float32; outputs are cast to the output's dtype. The loop shape is a flat loop
over live blocks with K-contiguous weight tiles (the form that ran fastest); on Hopper, operands
come either through pointers (cp.async pipelining) or through TMA tensor descriptors
(``USE_TMA``, the faster of the two); the launch order puts the programs that share an X tile
next to each other so X is read from DRAM about once and the packed weight stays in L2.
Configurations are picked per shape by ``triton.autotune`` (first call per shape); the weight
gradient's slices of M come from :mod:`sparsetrain.kernels.wgrad_slices`. Each autotuned launch
costs tens of microseconds of Python in Triton's launch path; after the first call of each
argument signature :mod:`sparsetrain.kernels.launch` calls the compiled kernel directly.

Forward and input gradient are bound by their output store, which does not overlap the next
tile's MMAs: each step's TMA coordinates come from an index loaded in the loop, so Triton
pipelines the loads only two deep. ``docs/block_kernels.md`` says what was tried against that and
why it was refuted; BENCHMARKS.md has the figures; ``benchmarks/kernel_resources.py`` prints each
kernel's registers and shared memory without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from sparsetrain.kernels.blocks import BlockLayout, write_blocks
from sparsetrain.kernels.launch import Launcher
from sparsetrain.kernels.wgrad_slices import wgrad_slices

try:  # TMA descriptors (Hopper and later); absent in older Tritons
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton version
    TensorDescriptor = None

__all__ = ["dgrad", "forward", "pack", "tma_available", "wgrad"]


def tma_available(device: torch.device) -> bool:
    """TMA descriptors: Triton support and a Hopper-or-later GPU (or the interpreter)."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return _hopper_or_later(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _hopper_or_later(index: int) -> bool:
    """Asked once per GPU: the capability query costs microseconds per call in the eager path."""
    return torch.cuda.get_device_capability(index)[0] >= 9


# (BM, BK, warps, stages): a short list (each is compiled and timed on the first call per shape);
# 128-row tiles with 64-wide K steps are what Hopper's wgmma wants, the rest are for small or
# odd shapes.
_MM_CONFIGS = ((128, 64, 4, 4), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 2))
_WGRAD_CONFIGS = ((64, 64, 4, 4), (64, 64, 8, 4), (64, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 32, 4, 6))


def _configs(table) -> list[triton.Config]:
    return [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in table]


def _prune(configs, named_args, **kwargs):
    """Fit the configs to the call: a K step never longer than the block side it walks (a
    smaller block side is taken whole), and no 128-row M tile for inputs of 64 rows or fewer."""
    side = kwargs.get("SPLIT_SIDE") or named_args.get("SPLIT_SIDE")
    m = named_args["M"]
    fitted, seen = [], set()
    for c in configs:
        bm, bk = c.kwargs["BM"], min(c.kwargs["BK"], side)
        if bm > 64 and m <= 64:
            continue
        key = (bm, bk, c.num_warps, c.num_stages)
        if key in seen:
            continue
        seen.add(key)
        fitted.append(triton.Config({"BM": bm, "BK": bk}, num_warps=c.num_warps, num_stages=c.num_stages,
                                    pre_hook=c.pre_hook))
    return fitted


def _set_blocks(kind: str):
    """pre_hook: give the TMA descriptors this config's block shapes."""

    def hook(nargs):
        if not nargs.get("USE_TMA"):
            return
        bm, bk = nargs["BM"], nargs["BK"]
        br, bc = nargs["BR"], nargs["BC"]
        if kind == "fwd":
            nargs["a"].block_shape = [bm, bk]
            nargs["w"].block_shape = [br, bk]
            nargs["out"].block_shape = [bm, br]
        elif kind == "dgrad":
            nargs["a"].block_shape = [bm, bk]
            nargs["w"].block_shape = [bk, bc]
            nargs["out"].block_shape = [bm, bc]
        else:  # wgrad: a = dY (M, N), w = X (M, K)
            nargs["a"].block_shape = [bk, br]
            nargs["w"].block_shape = [bk, bc]

    return hook


def _autotune(kind: str, table):
    configs = _configs(table)
    for c in configs:
        c.pre_hook = _set_blocks(kind)
    return triton.autotune(
        configs=configs,
        key=["M", "N", "K", "NNZ", "BR", "BC", "USE_TMA"],
        prune_configs_by={"early_config_prune": _prune},
    )


@_autotune("fwd", _MM_CONFIGS)
@triton.jit
def _forward_kernel(
    a, w, out, row_ptr, row_cols, M, N, K, NNZ, stride_am, stride_om,
    BR: tl.constexpr, BC: tl.constexpr, SPLIT_SIDE: tl.constexpr, USE_TMA: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)  # one output tile per program
    n_rows = N // BR
    n = tile % n_rows  # block-rows of W fastest: neighbours share the X tile
    m0 = (tile // n_rows) * BM
    lo = tl.load(row_ptr + n)
    hi = tl.load(row_ptr + n + 1)
    steps: tl.constexpr = BC // BK
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    rm = m0 + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, BR)
    for t in range(lo * steps, hi * steps):
        blk = t // steps
        sub = (t % steps) * BK
        kb = tl.load(row_cols + blk)
        if USE_TMA:
            x = a.load([m0, kb * BC + sub])
            wt = w.load([blk * BR, sub])
        else:
            x = tl.load(a + rm[:, None] * stride_am + (kb * BC + sub + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            wt = tl.load(w + blk.to(tl.int64) * (BR * BC) + rr[:, None] * BC + (sub + rk)[None, :])
        acc = tl.dot(x, tl.trans(wt), acc)
    if USE_TMA:
        out.store([m0, n * BR], acc.to(out.dtype))
    else:
        dst = out + rm[:, None] * stride_om + (n * BR + rr)[None, :]
        tl.store(dst, acc.to(out.dtype.element_ty), mask=rm[:, None] < M)


@_autotune("dgrad", _MM_CONFIGS)
@triton.jit
def _dgrad_kernel(
    a, w, out, col_ptr, col_rows, col_ids, M, N, K, NNZ, stride_am, stride_om,
    BR: tl.constexpr, BC: tl.constexpr, SPLIT_SIDE: tl.constexpr, USE_TMA: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)  # one output tile per program
    k_cols = K // BC
    kb = tile % k_cols  # block-columns fastest: neighbours share the dY tile
    m0 = (tile // k_cols) * BM
    lo = tl.load(col_ptr + kb)
    hi = tl.load(col_ptr + kb + 1)
    steps: tl.constexpr = BR // BK
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    rm = m0 + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    rc = tl.arange(0, BC)
    for t in range(lo * steps, hi * steps):
        i = t // steps
        sub = (t % steps) * BK
        n = tl.load(col_rows + i)
        blk = tl.load(col_ids + i)
        if USE_TMA:
            dy = a.load([m0, n * BR + sub])
            wt = w.load([blk * BR + sub, 0])
        else:
            dy = tl.load(a + rm[:, None] * stride_am + (n * BR + sub + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            wt = tl.load(w + blk.to(tl.int64) * (BR * BC) + (sub + rk)[:, None] * BC + rc[None, :])
        acc = tl.dot(dy, wt, acc)
    if USE_TMA:
        out.store([m0, kb * BC], acc.to(out.dtype))
    else:
        dst = out + rm[:, None] * stride_om + (kb * BC + rc)[None, :]
        tl.store(dst, acc.to(out.dtype.element_ty), mask=rm[:, None] < M)


@_autotune("wgrad", _WGRAD_CONFIGS)
@triton.jit
def _wgrad_kernel(
    a, w, out, blk_rows, row_cols, M, N, K, NNZ, stride_am, stride_wm, per_slice,
    BR: tl.constexpr, BC: tl.constexpr, SPLIT_SIDE: tl.constexpr, USE_TMA: tl.constexpr, DIRECT: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # a = dY (M, N), w = X (M, K); BK is the step over M here (BM unused: one config axis).
    blk = tl.program_id(0)
    s = tl.program_id(1)
    n = tl.load(blk_rows + blk)
    kb = tl.load(row_cols + blk)
    m_lo = s * per_slice
    m_hi = tl.minimum(m_lo + per_slice, M)
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, BR)
    rc = tl.arange(0, BC)
    for m0 in range(m_lo, m_hi, BK):
        if USE_TMA:
            dy = a.load([m0, n * BR])
            x = w.load([m0, kb * BC])
        else:
            rows = m0 + rk
            inb = rows[:, None] < m_hi
            dy = tl.load(a + rows[:, None] * stride_am + (n * BR + rr)[None, :], mask=inb, other=0.0)
            x = tl.load(w + rows[:, None] * stride_wm + (kb * BC + rc)[None, :], mask=inb, other=0.0)
        acc = tl.dot(tl.trans(dy), x, acc)
    if DIRECT:  # the dense (N, K) gradient: this block's place
        dst = out + (n * BR + rr)[:, None] * K + (kb * BC + rc)[None, :]
    else:  # the (S, nnz, BR, BC) partial sums
        dst = out + ((s * NNZ + blk).to(tl.int64) * BR + rr[:, None]) * BC + rc[None, :]
    tl.store(dst, acc.to(out.dtype.element_ty))


@triton.jit
def _pack_kernel(w, out, blk_rows, row_cols, K, BR: tl.constexpr, BC: tl.constexpr, SUB: tl.constexpr):
    blk = tl.program_id(0)
    part = tl.program_id(1)
    n = tl.load(blk_rows + blk)
    kb = tl.load(row_cols + blk)
    rr = part * SUB + tl.arange(0, SUB)
    rc = tl.arange(0, BC)
    v = tl.load(w + (n * BR + rr).to(tl.int64)[:, None] * K + kb * BC + rc[None, :])
    tl.store(out + blk.to(tl.int64) * (BR * BC) + rr[:, None] * BC + rc[None, :], v.to(out.dtype.element_ty))


def pack(weight: torch.Tensor, layout: BlockLayout, dtype: torch.dtype) -> torch.Tensor:
    """The live blocks of ``weight`` as ``(nnz, br, bc)`` in ``dtype``: one pass, reading the live
    blocks only (what ``blocks.pack_blocks`` computes with two torch ops)."""
    (br, bc), w = layout.block, weight.contiguous()
    out = torch.empty(layout.nnz, br, bc, dtype=dtype, device=weight.device)
    if layout.nnz:
        sub = min(br, max(1, 4096 // bc))
        _pack_kernel[(layout.nnz, br // sub)](w, out, layout.blk_rows, layout.row_cols, w.shape[1], BR=br, BC=bc, SUB=sub)
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a row-major ``(rows, features)`` matrix; copied only when its rows are not
    unit-stride and non-overlapping (e.g. a broadcast gradient: stride 0, which TMA refuses)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[-1] else t.contiguous()


def _desc(t: torch.Tensor, use_tma: bool):
    """The tensor itself, or a TMA descriptor over it (block shape set per config by pre_hook).
    The 16-byte stride alignment TMA needs holds: feature sizes are multiples of 16 here."""
    if not use_tma:
        return t
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1] * t.ndim)


def _grid(count: int, rows: int):
    """One program per output tile (a persistent variant, one program per SM looping over tiles,
    was slower: docs/block_kernels.md)."""
    return lambda meta: (triton.cdiv(rows, meta["BM"]) * count,)


@functools.cache
def _launcher(kernel) -> Launcher:
    return Launcher(kernel)


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Run an autotuned kernel: after the first call of a signature, straight through its compiled
    launcher (:mod:`sparsetrain.kernels.launch`). Under Triton's CPU interpreter (tests) there is
    no benchmarker, so run the first configuration that survives pruning, with its pre_hook."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        _launcher(kernel)(grid, args, kwargs)
        return
    named = dict(zip(kernel.arg_names, args, strict=False))
    config = _prune(kernel.configs, named, **kwargs)[0]
    full = {**named, **kwargs, **config.all_kwargs()}
    config.pre_hook(full)
    kernel.fn[grid](*args, **kwargs, **config.kwargs)


def forward(x: torch.Tensor, packed: torch.Tensor, layout: BlockLayout, *, use_tma: bool) -> torch.Tensor:
    """``Y = X W^T``: ``x (..., K)`` in the compute dtype, ``packed (nnz, br, bc)`` the same."""
    x2 = _rows(x)
    (n, k), (br, bc) = layout.shape, layout.block
    m = x2.shape[0]
    if m == 0 or layout.nnz == 0:
        return x.new_zeros(*x.shape[:-1], n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    w2 = packed.view(-1, bc)
    _launch(
        _forward_kernel, _grid(n // br, m),
        _desc(x2, use_tma), _desc(w2, use_tma), _desc(y, use_tma), layout.row_ptr, layout.row_cols,
        m, n, k, layout.nnz, x2.stride(0), y.stride(0),
        BR=br, BC=bc, SPLIT_SIDE=bc, USE_TMA=use_tma,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def dgrad(dy: torch.Tensor, packed: torch.Tensor, layout: BlockLayout, *, use_tma: bool) -> torch.Tensor:
    """``dX = dY W``: ``dy (..., N)``; returns ``(..., K)`` in dy's dtype."""
    dy2 = _rows(dy)
    (n, k), (br, bc) = layout.shape, layout.block
    m = dy2.shape[0]
    if m == 0 or layout.nnz == 0:
        return dy.new_zeros(*dy.shape[:-1], k)
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    w2 = packed.view(-1, bc)
    _launch(
        _dgrad_kernel, _grid(k // bc, m),
        _desc(dy2, use_tma), _desc(w2, use_tma), _desc(dx, use_tma), layout.col_ptr, layout.col_rows, layout.col_ids,
        m, n, k, layout.nnz, dy2.stride(0), dx.stride(0),
        BR=br, BC=bc, SPLIT_SIDE=br, USE_TMA=use_tma,
    )  # fmt: skip
    return dx.reshape(*dy.shape[:-1], k)


def _slices(m: int, nnz: int, device: torch.device) -> int:
    """Slices of M for the weight gradient on this device (see :func:`wgrad_slices`)."""
    if device.type != "cuda":
        return 1 if m <= 64 else 2  # the interpreter: exercise both paths cheaply
    return _cuda_slices(m, nnz, device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4096)
def _cuda_slices(m: int, nnz: int, index: int) -> int:
    """Asked once per (rows, live blocks, GPU): the search costs host time in the eager path."""
    return wgrad_slices(m, nnz, torch.cuda.get_device_properties(index).multi_processor_count)


def wgrad(
    x: torch.Tensor, dy: torch.Tensor, layout: BlockLayout, *, out_dtype: torch.dtype, use_tma: bool,
    packed: bool = False,
) -> torch.Tensor:
    """``dW = dY^T X`` on the live blocks, exact zeros elsewhere: a dense ``(N, K)`` tensor of
    ``out_dtype`` (the weight's dtype: the gradient of an fp32 master weight is fp32). With
    ``packed``, the live blocks only: ``(nnz, br, bc)`` in the layout's block order, the gradient
    of a weight stored that way (``sparsity.block_linear``); no dense tensor is made."""
    x2, dy2 = _rows(x), _rows(dy)
    (n, k), (br, bc) = layout.shape, layout.block
    m = x2.shape[0]
    if m == 0 or layout.nnz == 0:
        shape = (layout.nnz, br, bc) if packed else (n, k)
        return torch.zeros(shape, dtype=out_dtype, device=x.device)
    slices = _slices(m, layout.nnz, x.device)
    per_slice = triton.cdiv(triton.cdiv(m, slices), 128) * 128  # a multiple of every BK
    slices = triton.cdiv(m, per_slice)
    direct = slices == 1 and not packed
    if direct:
        out = torch.zeros(n, k, dtype=out_dtype, device=x.device)
    else:  # the partial sums, (slices, nnz, br, bc): one slice is the packed result itself
        partial_dtype = out_dtype if slices == 1 else torch.float32
        out = torch.empty(slices, layout.nnz, br, bc, dtype=partial_dtype, device=x.device)
    _launch(
        _wgrad_kernel, (layout.nnz, slices),
        _desc(dy2, use_tma), _desc(x2, use_tma), out, layout.blk_rows, layout.row_cols,
        m, n, k, layout.nnz, dy2.stride(0), x2.stride(0), per_slice,
        BR=br, BC=bc, SPLIT_SIDE=128, USE_TMA=use_tma, DIRECT=direct,
    )  # fmt: skip
    if direct:
        return out
    blocks = out[0] if slices == 1 else out.sum(0).to(out_dtype)
    if packed:
        return blocks
    dw = torch.zeros(n, k, dtype=out_dtype, device=x.device)
    write_blocks(dw, blocks, layout)
    return dw
