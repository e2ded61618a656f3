"""Experimental forward and input-gradient kernel variants against the product kernels and
cuBLAS, one process.

    python benchmarks/kernel_variants.py --set stages|stores|ws --shapes 8192x2048 --sparsity 0.75,0.9 --json FILE

Why the forward and input-gradient products reach 2.6-2.7x of cuBLAS at 75% and not the 3.5x
their efficiency with every block live would allow (docs/block_kernels.md; figures in BENCHMARKS.md,
raw runs in benchmarks/results/kernel_variants.jsonl). Each set tests one explanation:

- ``--set stages``: the index loads. Nsight Compute on the 75% forward puts 46% of the stall
  cycles on L1TEX waits, i.e. ordinary global loads, and the only ones are the index tables.
  Compiled offline for sm_90, the product kernel gets a two-deep TMA pipeline whatever
  ``num_stages`` says: the coordinates of each load come from ``row_cols[blk]``, loaded in the
  loop. Variants: ``vector`` (the tile's block-columns read once before the loop, each step's
  taken out of registers), ``arith`` (an upper bound on a regular layout: every block-row has
  ``r`` live blocks at columns ``n mod s + j s``, ``s = K / (bc r)``; nothing is read; compared
  with ``product@regular``, the product kernel on the same layout), each with deeper pipelines
  and 32-wide K steps (3 CTAs per SM fit 64 KB of shared memory).
- ``--set stores``: the output store. ``nostore`` switches it off with a runtime flag (so the
  compiler keeps the products); ``ptr`` stores from registers, plain, ``evict_first`` or
  streaming (``.cs``), to see whether the output evicts the operands from L2.
- ``--set ws``: warp specialisation (a producer warp for the loads) with device-side TMA
  descriptors, with which Triton 3.6 compiles it for 128-row tiles on 4 warps (host descriptors
  do not: triton-lang/triton#11587), on the K loop or on the tile loop of a persistent grid.

(Persistent variants, 1-3 programs per SM with whole or split TMA stores, measured 1.3-2.0x
against the product kernel's 2.64x at 75%, 2026-11-28; their code is in git history, commit f23e694.)

Each variant is checked against the masked dense product, then timed over CUDA-graph replays
with cuBLAS in the same run. Not used by training: a variant that wins moves into
``src/sparsetrain/kernels/block_sparse.py`` with its tests.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sparsetrain.bench.layer import product_operands, sweep
from sparsetrain.bench.timing import graph_ms, rel
from sparsetrain.kernels.blocks import BlockLayout, pack_blocks, unpack_blocks

try:  # Triton: GPU machines only
    import triton
    import triton.language as tl

    from sparsetrain.kernels import block_sparse as bs
except ImportError:
    triton = tl = bs = None

PRODUCT, VECTOR, ARITH = 0, 1, 2  # IDX modes

if triton is not None:

    @triton.jit
    def _forward_variant(
        a, w, out, out_ptr, row_ptr, row_cols, M, N, K, STORE, R,
        BR: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, IDX: tl.constexpr,
        MAXR: tl.constexpr, PTR_STORE: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        n_rows = N // BR
        n = tile % n_rows
        m0 = (tile // n_rows) * BM
        steps: tl.constexpr = BC // BK
        if IDX == 2:  # regular layout: r blocks per row, ids in row-major order
            lo = n * R
            hi = lo + R
        else:
            lo = tl.load(row_ptr + n)
            hi = tl.load(row_ptr + n + 1)
        rj = tl.arange(0, MAXR)
        if IDX == 1:
            cols = tl.load(row_cols + lo + rj, mask=rj < hi - lo, other=0)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for t in range(lo * steps, hi * steps):
            blk = t // steps
            sub = (t % steps) * BK
            if IDX == 0:
                kb = tl.load(row_cols + blk)
            elif IDX == 1:
                kb = tl.sum(tl.where(rj == blk - lo, cols, 0), axis=0)
            else:
                kb = n % ((K // BC) // R) + (blk - lo) * ((K // BC) // R)
            x = a.load([m0, kb * BC + sub])
            wt = w.load([blk * BR, sub])
            acc = tl.dot(x, tl.trans(wt), acc)
        if STORE != 0:
            _store_tile(out, out_ptr, acc, m0, n * BR, M, N, BM, BR, PTR_STORE)

    @triton.jit
    def _store_tile(out, out_ptr, acc, m0, c0, M, ld, BM: tl.constexpr, BW: tl.constexpr, PTR_STORE: tl.constexpr):
        """PTR_STORE 0: TMA store; 1: pointer store; 2: with evict_first; 3: streaming (.cs)."""
        if PTR_STORE == 0:
            out.store([m0, c0], acc.to(out.dtype))
        else:
            rm = m0 + tl.arange(0, BM)
            dst = out_ptr + rm.to(tl.int64)[:, None] * ld + (c0 + tl.arange(0, BW))[None, :]
            v = acc.to(out_ptr.dtype.element_ty)
            if PTR_STORE == 1:
                tl.store(dst, v, mask=rm[:, None] < M)
            elif PTR_STORE == 2:
                tl.store(dst, v, mask=rm[:, None] < M, eviction_policy="evict_first")
            else:
                tl.store(dst, v, mask=rm[:, None] < M, cache_modifier=".cs")

    @triton.jit
    def _dgrad_variant(
        a, w, out, out_ptr, col_ptr, col_rows, col_ids, M, K, STORE,
        BR: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, IDX: tl.constexpr,
        MAXR: tl.constexpr, PTR_STORE: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        k_cols = K // BC
        kb = tile % k_cols
        m0 = (tile // k_cols) * BM
        steps: tl.constexpr = BR // BK
        lo = tl.load(col_ptr + kb)
        hi = tl.load(col_ptr + kb + 1)
        rj = tl.arange(0, MAXR)
        if IDX == 1:
            rows = tl.load(col_rows + lo + rj, mask=rj < hi - lo, other=0)
            ids = tl.load(col_ids + lo + rj, mask=rj < hi - lo, other=0)
        acc = tl.zeros((BM, BC), dtype=tl.float32)
        for t in range(lo * steps, hi * steps):
            i = t // steps
            sub = (t % steps) * BK
            if IDX == 0:
                n = tl.load(col_rows + i)
                blk = tl.load(col_ids + i)
            else:
                n = tl.sum(tl.where(rj == i - lo, rows, 0), axis=0)
                blk = tl.sum(tl.where(rj == i - lo, ids, 0), axis=0)
            dy = a.load([m0, n * BR + sub])
            wt = w.load([blk * BR + sub, 0])
            acc = tl.dot(dy, wt, acc)
        if STORE != 0:
            _store_tile(out, out_ptr, acc, m0, kb * BC, M, K, BM, BC, PTR_STORE)


    @triton.jit
    def _forward_ws(
        x_ptr, w_ptr, y_ptr, row_ptr, row_cols, M, N, K, NNZ, NUM_PROGS,
        BR: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr,
        PERSISTENT: tl.constexpr,
    ):  # fmt: skip
        """Device-side TMA descriptors (with which Triton 3.6 compiles warp specialisation for
        128-row tiles on 4 warps); WS on the K loop, or on the tile loop of a persistent grid."""
        a = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        w = tl.make_tensor_descriptor(w_ptr, shape=[NNZ * BR, BC], strides=[BC, 1], block_shape=[BR, BK])
        out = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BR])
        n_rows = N // BR
        steps: tl.constexpr = BC // BK
        if PERSISTENT:
            for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * n_rows, NUM_PROGS, warp_specialize=WS):
                n = tile % n_rows
                m0 = (tile // n_rows) * BM
                lo = tl.load(row_ptr + n)
                hi = tl.load(row_ptr + n + 1)
                acc = tl.zeros((BM, BR), dtype=tl.float32)
                for t in range(lo * steps, hi * steps):
                    blk = t // steps
                    sub = (t % steps) * BK
                    kb = tl.load(row_cols + blk)
                    acc = tl.dot(a.load([m0, kb * BC + sub]), tl.trans(w.load([blk * BR, sub])), acc)
                out.store([m0, n * BR], acc.to(out.dtype))
        else:
            tile = tl.program_id(0)
            n = tile % n_rows
            m0 = (tile // n_rows) * BM
            lo = tl.load(row_ptr + n)
            hi = tl.load(row_ptr + n + 1)
            acc = tl.zeros((BM, BR), dtype=tl.float32)
            for t in tl.range(lo * steps, hi * steps, warp_specialize=WS):
                blk = t // steps
                sub = (t % steps) * BK
                kb = tl.load(row_cols + blk)
                acc = tl.dot(a.load([m0, kb * BC + sub]), tl.trans(w.load([blk * BR, sub])), acc)
            out.store([m0, n * BR], acc.to(out.dtype))


def _maxr(ptr: torch.Tensor) -> int:
    """A power of two (at least 2) covering the longest row (or column) list of a layout."""
    longest = int((ptr[1:] - ptr[:-1]).max()) if ptr.numel() > 1 else 1
    return max(2, triton.next_power_of_2(longest))


def _descs(tensors_and_blocks):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return [TensorDescriptor(t, list(t.shape), list(t.stride()), blk) for t, blk in tensors_and_blocks]


def forward_variant(
    x, packed, layout: BlockLayout, maxr, *, idx=PRODUCT, store=True, ptr_store=0, r=0, bm=128, bk=64, warps=4, stages=4
):
    """``Y = X W^T`` by the experimental kernel (TMA only); ``maxr``: ``_maxr(layout.row_ptr)`` (computed
    outside: it reads the GPU, which CUDA-graph capture forbids); ``r``: live blocks per row (ARITH)."""
    (n, k), (br, bc) = layout.shape, layout.block
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    w2 = packed.view(-1, bc)
    da, dw, dy = _descs([(x, [bm, bk]), (w2, [br, bk]), (y, [bm, br])])
    _forward_variant[(triton.cdiv(m, bm) * (n // br),)](
        da, dw, dy, y, layout.row_ptr, layout.row_cols, m, n, k, int(store), r,
        BR=br, BC=bc, BM=bm, BK=bk, IDX=idx, MAXR=maxr, PTR_STORE=ptr_store, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def forward_ws(x, packed, layout: BlockLayout, maxr=None, *, ws=True, per_sm=0, bm=128, bk=64, warps=4, stages=2):
    """``Y = X W^T`` with device-side descriptors; ``per_sm`` > 0: a persistent grid of that many
    programs per SM. ``maxr`` is unused (the same call shape as the other variants)."""
    (n, k), (br, bc) = layout.shape, layout.block
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, bm) * (n // br)
    if per_sm and x.device.type == "cuda":
        progs = min(tiles, per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:
        progs = min(tiles, 2) if per_sm else tiles
    _forward_ws[(progs,)](
        x, packed, y, layout.row_ptr, layout.row_cols, m, n, k, layout.nnz, progs,
        BR=br, BC=bc, BM=bm, BK=bk, WS=ws, PERSISTENT=bool(per_sm), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def _scratch(size: int, alignment: int, stream):
    """Global memory for device-side TMA descriptors (Triton asks per launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def dgrad_variant(
    dy, packed, layout: BlockLayout, maxr, *, idx=PRODUCT, store=True, ptr_store=0, bm=128, bk=64, warps=4, stages=4
):
    """``dX = dY W`` by the experimental kernel (TMA only); ``maxr``: ``_maxr(layout.col_ptr)``."""
    (_, k), (br, bc) = layout.shape, layout.block
    m = dy.shape[0]
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    w2 = packed.view(-1, bc)
    da, dw, do = _descs([(dy, [bm, bk]), (w2, [bk, bc]), (dx, [bm, bc])])
    _dgrad_variant[(triton.cdiv(m, bm) * (k // bc),)](
        da, dw, do, dx, layout.col_ptr, layout.col_rows, layout.col_ids, m, k, int(store),
        BR=br, BC=bc, BM=bm, BK=bk, IDX=idx, MAXR=maxr, PTR_STORE=ptr_store, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dx


def regular_layout(n: int, k: int, sparsity: float, block: int, device) -> tuple[BlockLayout, int]:
    """Every block-row has ``r`` live blocks, at columns ``row mod s + j s`` (``s = cols // r``,
    ``j < r``): increasing in ``j``, so ``j`` is also the packed order."""
    rows, cols = n // block, k // block
    r = max(1, round(cols * (1 - sparsity)))
    grid = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for j in range(r):
            grid[i, i % (cols // r) + j * (cols // r)] = True
    return BlockLayout.build(grid.to(device), (block, block)), r


# (BK, stages): with the index load in the loop Triton pipelines the TMA loads one step ahead
# whatever num_stages says (64 KB of shared memory: 3 CTAs per SM); without it, each stage is a
# buffer (32 KB at BK 64, 16 KB at BK 32) and 3 CTAs per SM fit up to 64 KB.
STEPS = ((64, 2), (64, 3), (32, 3), (32, 4), (32, 5))
STORES = {"same": {}, "nostore": {"store": False}, "ptr": {"ptr_store": 1}, "ptr evict_first": {"ptr_store": 2},
          "ptr .cs": {"ptr_store": 3}}
VARIANT_SETS = {
    # third call: where the time goes (index loads, prefetch depth, the store)
    "stages": {
        "fwd": {
            "nostore": ({"store": False}, False),
            "product@regular": ({}, True),
            **{f"vector bk{bk} s{st}": ({"idx": VECTOR, "bk": bk, "stages": st}, False) for bk, st in STEPS},
            **{f"arith@regular bk{bk} s{st}": ({"idx": ARITH, "bk": bk, "stages": st}, True) for bk, st in STEPS},
        },
        "dgrad": {
            "nostore": ({"store": False}, False),
            **{f"vector bk{bk} s{st}": ({"idx": VECTOR, "bk": bk, "stages": st}, False) for bk, st in STEPS},
        },
    },
    # sixth call: warp specialisation with device-side descriptors (forward only)
    "ws": {
        "fwd": {
            **{f"ws tile s{st}": ({"ws": True, "stages": st}, False) for st in (2, 3)},
            "no-ws devdesc s2": ({"ws": False, "stages": 2}, False),
            **{f"ws persistent {ps}/SM s{st}": ({"ws": True, "per_sm": ps, "stages": st}, False)
               for ps, st in ((1, 2), (1, 3), (2, 2))},
        },
        "dgrad": {},
    },
    # fourth call: the output store with L2 eviction hints (2 and 4 stages: 2 is the product's depth)
    "stores": {
        product: {f"{name} s{st}": ({**kw, "stages": st}, False) for name, kw in STORES.items() for st in (2, 4)}
        for product in ("fwd", "dgrad")
    },
}


def one_shape(n: int, k: int, sparsity: float, m: int, block: int, device="cuda", timer=None, which="stores") -> dict:
    timer = timer or (lambda fn: graph_ms(fn, rep=100))
    ops = product_operands(n, k, sparsity, block, m, device)
    t, x, dy, wp, wm = ops.t, ops.x, ops.dy, ops.wp, ops.wm
    reg, r = regular_layout(n, k, sparsity, block, device)
    wpr = pack_blocks(torch.randn(n, k, device=device), reg, x.dtype)
    wmr = unpack_blocks(wpr, reg, x.dtype)
    res: dict = {"shape": f"{n}x{k}", "sparsity": sparsity, "tokens": m, "live_blocks": t.nnz,
                 "regular_live_blocks": reg.nnz}
    products = {
        "fwd": (lambda w_: x @ w_.T, lambda: bs.forward(x, wp, t, use_tma=True), forward_variant, x),
        "dgrad": (lambda w_: dy @ w_, lambda: bs.dgrad(dy, wp, t, use_tma=True), dgrad_variant, dy),
    }  # fmt: skip
    for product, (dense, ours, variant, inp) in products.items():
        table = VARIANT_SETS[which][product]
        if which == "ws" and product == "fwd":
            variant = forward_ws
        r_ = res[product] = {"cublas_ms": timer(lambda dense=dense: dense(wm)), "product_ms": timer(ours)}
        for name, (kw, regular) in table.items():
            lay, pk, ref = (reg, wpr, dense(wmr)) if regular else (t, wp, dense(wm))
            kw = {**kw, "r": r} if kw.get("idx") == ARITH else kw
            maxr = _maxr(lay.row_ptr if product == "fwd" else lay.col_ptr)

            def call(kw=kw, lay=lay, pk=pk, variant=variant, inp=inp, maxr=maxr):
                return variant(inp, pk, lay, maxr, **kw)

            try:
                if kw.get("store", True):
                    err = rel(call(), ref)
                    if not err < 2e-2:
                        raise AssertionError(f"relative error {err:.2e}")
                r_[name] = timer(call)
            except Exception as e:  # noqa: BLE001 - a variant that fails is a result too
                r_[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x2048,3072x768")
    ap.add_argument("--sparsity", default="0,0.75,0.9")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--set", default="stores", choices=sorted(VARIANT_SETS), help="which variants")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() or bs is None:
        print("kernel_variants.py needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    triton.set_allocator(_scratch)
    sweep(a.shapes, a.sparsity, lambda n, k, sp: one_shape(n, k, sp, a.tokens, a.block_size, which=a.set), show,
          a.json)  # fmt: skip
    return 0


def show(r: dict) -> None:
    for product in ("fwd", "dgrad"):
        p = r[product]
        line = (f"{r['shape']} {r['sparsity']:g} ({r['live_blocks']} blocks, regular {r['regular_live_blocks']}) "
                f"{product}: product {p['cublas_ms'] / p['product_ms']:.2f}x")
        for name, v in p.items():
            if name not in ("cublas_ms", "product_ms"):
                line += f" | {name} " + (f"{p['cublas_ms'] / v:.2f}x" if isinstance(v, float) else v)
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
