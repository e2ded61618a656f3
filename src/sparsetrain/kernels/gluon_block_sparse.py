"""Hopper (sm_90) Gluon kernels for the block-sparse forward and input gradient, ping-pong style.

Same contract as :func:`sparsetrain.kernels.block_sparse.forward` / ``dgrad``: ``Y = X Wp^T`` over
the live blocks of each block-row of W, ``dX = dY Wp`` over the live blocks of each block-column,
every output tile written (zeros where a row or column has no live block), fp32 accumulation.

Why a second kernel: the Triton kernels lose their margin on the output store, which does not
overlap the next tile's MMAs (BENCHMARKS.md, fifth session: with the store off the forward runs
3.2x / 7.4x cuBLAS at 75% / 90% against 2.7x / 5.2x). Triton 3.6 generates no schedule that
hides it, so this one is written out (CUTLASS's "ping-pong" warp-specialised GEMM):

- a persistent grid, one CTA per SM, walking the output tiles ``pid, pid + G, ...``;
- a producer warp issuing TMA loads of (X tile, weight tile) pairs into a ring of ``STAGES``
  shared-memory slots, each guarded by a ready / empty mbarrier pair;
- two consumer warpgroups taking the CTA's tiles in turn, each with its own 128 x 128 fp32
  accumulator in registers and its own output buffer; an mbarrier pair hands the tensor cores
  from one to the other per tile, so one's epilogue (cast, shared-memory write, TMA store) runs
  while the other's MMAs do. (Without that hand-over the kernel hangs: with one shared ring a
  consumer could wait on a slot more than one phase ahead, which a parity wait cannot tell from
  an old phase.)

Both consumers read the one ring in the producer's order; each skips the other's steps by
counting them from ``ptr`` (the live-block count of a tile is known from its row or column).
Odd token counts need nothing: TMA loads past M read zeros and TMA stores past M are dropped.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sparsetrain.kernels.blocks import BlockLayout

__all__ = ["CONFIG", "dgrad", "forward", "gluon_ok"]

# (BM, BK, STAGES, EARLY_TURN: hand the tensor cores over once the MMAs are issued, not done): 128-row tiles (one wgmma warpgroup's natural M), 64-wide K steps
# (128-byte rows: the widest TMA swizzle), 4 ring slots of 32 KB, two 32 KB output buffers.
CONFIG = {"BM": 128, "BK": 64, "STAGES": 4, "EARLY_TURN": True}
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def gluon_ok(block: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether these kernels take the call: 128 x 128 blocks (the accumulator is one block
    side wide; other sides stay on the Triton kernels) in bf16 or fp16."""
    return tuple(block) == (128, 128) and dtype in _GL_DTYPES


@gluon.jit
def _steps(ptr, tile, n_out, STEPS: gl.constexpr):
    """The K steps of ``tile``: its row's (column's) live blocks times steps per block."""
    o = tile % n_out
    return (gl.load(ptr + o + 1) - gl.load(ptr + o)) * STEPS


@gluon.jit
def _producer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, ptr, acol, wid, n_out, num_tiles,
              FWD: gl.constexpr, SIDE: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
              STEPS: gl.constexpr):  # fmt: skip
    """One warp: walk the CTA's tiles in order and fill the ring, one (A, W) pair per K step."""
    stages: gl.constexpr = a_bufs.type.shape[0]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes
    g = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        o = tile % n_out
        m0 = (tile // n_out) * BM
        lo = gl.load(ptr + o) * STEPS
        hi = gl.load(ptr + o + 1) * STEPS
        for t in range(lo, hi):
            i = t // STEPS
            sub = (t % STEPS) * BK
            col = gl.load(acol + i)
            s = g % stages
            mbarrier.wait(empty.index(s), ((g // stages) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(a_desc, [m0, col * SIDE + sub], bar, a_bufs.index(s))
            if FWD:  # W tile (BR, BK) of block i: its rows, columns sub..
                tma.async_copy_global_to_shared(w_desc, [i * SIDE, sub], bar, w_bufs.index(s))
            else:  # W tile (BK, BC) of block col_ids[i]: rows sub.. of it
                blk = gl.load(wid + i)
                tma.async_copy_global_to_shared(w_desc, [blk * SIDE + sub, 0], bar, w_bufs.index(s))
            g += 1


@gluon.jit
def _consumer(a_bufs, w_bufs, c_buf, c_desc, ready, empty, turn, ptr, n_out, num_tiles,
              ME: gl.constexpr, FWD: gl.constexpr, BM: gl.constexpr, BO: gl.constexpr,
              STEPS: gl.constexpr, EARLY_TURN: gl.constexpr):  # fmt: skip
    """One warpgroup: the CTA's tiles ME, ME + 2, ...; MMAs over the ring, then the epilogue
    (its TMA store left in flight while the next tile's MMAs run)."""
    stages: gl.constexpr = a_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BO, 16])
    pid = gl.program_id(0)
    grid = gl.num_programs(0)
    g = 0
    if ME == 1:  # the first tile is the other consumer's
        g = _steps(ptr, pid, n_out, STEPS)
    jj = 0
    for tile in range(pid + ME * grid, num_tiles, 2 * grid):
        o = tile % n_out
        m0 = (tile // n_out) * BM
        n = _steps(ptr, tile, n_out, STEPS)
        acc = gl.zeros((BM, BO), dtype=gl.float32, layout=layout)
        # the tensor cores' turn (consumer 0 starts): also what keeps the other consumer's
        # ring slots at most one phase ahead of this one's parity waits
        mbarrier.wait(turn.index(ME), (jj & 1) ^ (1 - ME))
        for t in range(n):
            s = (g + t) % stages
            mbarrier.wait(ready.index(s), ((g + t) // stages) & 1)
            if FWD:
                b = w_bufs.index(s).permute((1, 0))
            else:
                b = w_bufs.index(s)
            acc = warpgroup_mma(a_bufs.index(s), b, acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc,))
            mbarrier.arrive(empty.index((g + t + stages - 1) % stages), pred=t > 0)
        if EARLY_TURN:  # every MMA issued: the other's queue behind them
            mbarrier.arrive(turn.index(1 - ME))
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((g + n + stages - 1) % stages), pred=n > 0)
        if not EARLY_TURN:  # every MMA done
            mbarrier.arrive(turn.index(1 - ME))
        g += n
        nxt = tile + grid  # the other consumer's tile: skip its steps in the ring
        if nxt < num_tiles:
            g += _steps(ptr, nxt, n_out, STEPS)
        tma.store_wait(0)  # this buffer's previous store has been read out
        c_buf.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [m0, o * BO], c_buf)
        jj += 1
    tma.store_wait(0)


@gluon.jit
def _consumer1(a_desc, w_desc, a_bufs, w_bufs, ready, empty, ptr, acol, wid, n_out, num_tiles,
               FWD: gl.constexpr, SIDE: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
               STEPS: gl.constexpr, c_bufs, c_desc, turn, BO: gl.constexpr, EARLY_TURN: gl.constexpr):  # fmt: skip
    _consumer(a_bufs, w_bufs, c_bufs.index(1), c_desc, ready, empty, turn, ptr, n_out, num_tiles,
              1, FWD, BM, BO, STEPS, EARLY_TURN)  # fmt: skip


@gluon.jit
def _producer_w(a_desc, w_desc, a_bufs, w_bufs, ready, empty, ptr, acol, wid, n_out, num_tiles,
                FWD: gl.constexpr, SIDE: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                STEPS: gl.constexpr, c_bufs, c_desc, turn, BO: gl.constexpr, EARLY_TURN: gl.constexpr):  # fmt: skip
    _producer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, ptr, acol, wid, n_out, num_tiles,
              FWD, SIDE, BM, BK, STEPS)  # fmt: skip


@gluon.jit
def _block_sparse_kernel(a_desc, w_desc, c_desc, ptr, acol, wid, n_out, num_tiles,
                         FWD: gl.constexpr, SIDE: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                         BO: gl.constexpr, STAGES: gl.constexpr, EARLY_TURN: gl.constexpr):  # fmt: skip
    """FWD: A = X, tiles over (M, block-rows), SIDE = BC; else A = dY, (M, block-columns), SIDE = BR."""
    STEPS: gl.constexpr = SIDE // BK
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    # (an inline tuple: a tuple assigned to a name would turn its constexprs into tensors)
    gl.warp_specialize([
        (_consumer, (a_bufs, w_bufs, c_bufs.index(0), c_desc, ready, empty, turn, ptr, n_out, num_tiles,
                     0, FWD, BM, BO, STEPS, EARLY_TURN)),
        (_consumer1, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, ptr, acol, wid, n_out, num_tiles,
                      FWD, SIDE, BM, BK, STEPS, c_bufs, c_desc, turn, BO, EARLY_TURN)),
        (_producer_w, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, ptr, acol, wid, n_out, num_tiles,
                       FWD, SIDE, BM, BK, STEPS, c_bufs, c_desc, turn, BO, EARLY_TURN)),
    ], [4, 1], [232, 40])  # fmt: skip


@functools.cache
def _nvmma(shape, dtype):
    return gl.NVMMASharedLayout.get_default_for(list(shape), _GL_DTYPES[dtype])


def _desc(t: torch.Tensor, block) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), _nvmma(tuple(block), t.dtype))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _run(a2, packed, out, layout: BlockLayout, fwd: bool, config) -> None:
    (br, bc), m = layout.block, a2.shape[0]
    bm, bk = config["BM"], config["BK"]
    w2 = packed.view(-1, bc)
    if fwd:
        side, bo, n_out, tabs = bc, br, layout.shape[0] // br, (layout.row_ptr, layout.row_cols, layout.row_cols)
        w_block = (br, bk)
    else:
        side, bo, n_out, tabs = br, bc, layout.shape[1] // bc, (layout.col_ptr, layout.col_rows, layout.col_ids)
        w_block = (bk, bc)
    num_tiles = triton.cdiv(m, bm) * n_out
    grid = (min(num_tiles, _sm_count(a2.device.index or 0)),)
    _block_sparse_kernel[grid](
        _desc(a2, (bm, bk)), _desc(w2, w_block), _desc(out, (bm, bo)), *tabs, n_out, num_tiles,
        FWD=fwd, SIDE=side, BM=bm, BK=bk, BO=bo, STAGES=config["STAGES"], EARLY_TURN=config["EARLY_TURN"],
        num_warps=4, maxnreg=168,
    )  # fmt: skip


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[-1] and t.stride(0) % 8 == 0 else t.contiguous()


def forward(x: torch.Tensor, packed: torch.Tensor, layout: BlockLayout, config=None) -> torch.Tensor:
    """``Y = X Wp^T`` (see the module docstring): ``x (..., K)``, ``packed (nnz, br, bc)``."""
    return _product(x, packed, layout, True, config)


def dgrad(dy: torch.Tensor, packed: torch.Tensor, layout: BlockLayout, config=None) -> torch.Tensor:
    """``dX = dY Wp``: ``dy (..., N)``; returns ``(..., K)`` in dy's dtype."""
    return _product(dy, packed, layout, False, config)


def _product(a: torch.Tensor, packed: torch.Tensor, layout: BlockLayout, fwd: bool, config) -> torch.Tensor:
    """Either product over ``a``'s rows: N output columns forward, K for the input gradient."""
    a2 = _rows(a)
    width, m = layout.shape[0 if fwd else 1], a2.shape[0]
    if m == 0 or layout.nnz == 0:
        return a.new_zeros(*a.shape[:-1], width)
    out = torch.empty(m, width, dtype=a.dtype, device=a.device)
    _run(a2, packed, out, layout, fwd, config or CONFIG)
    return out.reshape(*a.shape[:-1], width)
