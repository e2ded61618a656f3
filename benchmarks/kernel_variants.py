"""Experimental forward and input-gradient kernel variants against the product kernels and
cuBLAS, one process.

    python benchmarks/kernel_variants.py --shapes 8192x2048,3072x768 --sparsity 0.75,0.9 --json FILE

The question (NOTES_block_kernels.md, fourth session): at 75% the forward product takes about
its compute time plus the time to write its output, as if the tile stores did not overlap other
tiles' compute. The variants here try to overlap them:

- ``persistent``: a grid of ``programs_per_sm`` x SMs programs, each looping over output tiles
  (``tile = pid, pid + P, ...``) with the K loop left as its own pipelined loop (no
  ``flatten``: the flattened persistent loop measured slower, third session). The TMA store of one
  tile is asynchronous, so the next tile's loads may start under it.
- ``persistent_split``: the same, the output tile stored as two 128x64 halves (Triton's
  "epilogue subtiling"): half the staging buffer, the first half's store issued earlier
  (forward only).

Each variant is checked against the masked dense product, then timed over CUDA-graph replays
with the product kernel's autotuned launch and cuBLAS in the same run. Not used by training: a
variant that wins moves into ``src/sparsetrain/kernels/block_sparse.py`` with its tests.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sparsetrain.bench_layer import graph_ms, product_operands, rel
from sparsetrain.kernels.block_layout import BlockLayout

try:  # Triton: GPU machines only
    import triton
    import triton.language as tl

    from sparsetrain.kernels import block_sparse as bs
except ImportError:
    triton = tl = bs = None


if triton is not None:

    @triton.jit
    def _forward_persistent(
        a, w, out, row_ptr, row_cols, M, N, NUM_PROGS,
        BR: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, SPLIT_STORE: tl.constexpr,
    ):  # fmt: skip
        n_rows = N // BR
        tiles = tl.cdiv(M, BM) * n_rows
        steps: tl.constexpr = BC // BK
        for tile in tl.range(tl.program_id(0), tiles, NUM_PROGS):
            n = tile % n_rows  # block-rows fastest, as in the product kernel
            m0 = (tile // n_rows) * BM
            lo = tl.load(row_ptr + n)
            hi = tl.load(row_ptr + n + 1)
            acc = tl.zeros((BM, BR), dtype=tl.float32)
            for t in range(lo * steps, hi * steps):
                blk = t // steps
                sub = (t % steps) * BK
                kb = tl.load(row_cols + blk)
                x = a.load([m0, kb * BC + sub])
                wt = w.load([blk * BR, sub])
                acc = tl.dot(x, tl.trans(wt), acc)
            if SPLIT_STORE:
                halves = tl.reshape(acc, (BM, 2, BR // 2))
                halves = tl.permute(halves, (0, 2, 1))
                left, right = tl.split(halves)
                out.store([m0, n * BR], left.to(out.dtype))
                out.store([m0, n * BR + BR // 2], right.to(out.dtype))
            else:
                out.store([m0, n * BR], acc.to(out.dtype))

    @triton.jit
    def _dgrad_persistent(
        a, w, out, col_ptr, col_rows, col_ids, M, K, NUM_PROGS,
        BR: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        k_cols = K // BC
        tiles = tl.cdiv(M, BM) * k_cols
        steps: tl.constexpr = BR // BK
        for tile in tl.range(tl.program_id(0), tiles, NUM_PROGS):
            kb = tile % k_cols  # block-columns fastest, as in the product kernel
            m0 = (tile // k_cols) * BM
            lo = tl.load(col_ptr + kb)
            hi = tl.load(col_ptr + kb + 1)
            acc = tl.zeros((BM, BC), dtype=tl.float32)
            for t in range(lo * steps, hi * steps):
                i = t // steps
                sub = (t % steps) * BK
                n = tl.load(col_rows + i)
                blk = tl.load(col_ids + i)
                dy = a.load([m0, n * BR + sub])
                wt = w.load([blk * BR + sub, 0])
                acc = tl.dot(dy, wt, acc)
            out.store([m0, kb * BC], acc.to(out.dtype))


def _programs(x: torch.Tensor, per_sm: int, tiles: int) -> int:
    if x.device.type == "cuda":
        progs = per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:  # Triton's interpreter (correctness checks on the CPU): two programs share the tiles
        progs = 2
    return min(progs, tiles)


def dgrad_persistent(dy, packed, layout: BlockLayout, *, bm=128, bk=64, warps=4, stages=3, per_sm=1):
    """``dX = dY W`` by the persistent variant (TMA only)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (_, k), (br, bc) = layout.shape, layout.block
    m = dy.shape[0]
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    w2 = packed.view(-1, bc)
    da = TensorDescriptor(dy, list(dy.shape), list(dy.stride()), [bm, bk])
    dw = TensorDescriptor(w2, list(w2.shape), list(w2.stride()), [bk, bc])
    do = TensorDescriptor(dx, list(dx.shape), list(dx.stride()), [bm, bc])
    progs = _programs(dy, per_sm, triton.cdiv(m, bm) * (k // bc))
    _dgrad_persistent[(progs,)](
        da, dw, do, layout.col_ptr, layout.col_rows, layout.col_ids, m, k, progs,
        BR=br, BC=bc, BM=bm, BK=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dx


def forward_persistent(x, packed, layout: BlockLayout, *, bm=128, bk=64, warps=4, stages=3, per_sm=1, split=False):
    """``Y = X W^T`` by the persistent variant (TMA only)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (n, _), (br, bc) = layout.shape, layout.block
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    w2 = packed.view(-1, bc)
    da = TensorDescriptor(x, list(x.shape), list(x.stride()), [bm, bk])
    dw = TensorDescriptor(w2, list(w2.shape), list(w2.stride()), [br, bk])
    dy = TensorDescriptor(y, list(y.shape), list(y.stride()), [bm, br // 2 if split else br])
    progs = _programs(x, per_sm, triton.cdiv(m, bm) * (n // br))
    _forward_persistent[(progs,)](
        da, dw, dy, layout.row_ptr, layout.row_cols, m, n, progs,
        BR=br, BC=bc, BM=bm, BK=bk, SPLIT_STORE=split, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


VARIANTS = {  # name: keyword arguments of forward_persistent
    "persistent 1/SM, 3 stages": {"per_sm": 1, "stages": 3},
    "persistent 2/SM, 3 stages": {"per_sm": 2, "stages": 3},
    "persistent 2/SM, 2 stages": {"per_sm": 2, "stages": 2},
    "persistent 3/SM, 2 stages": {"per_sm": 3, "stages": 2},
    "persistent_split 2/SM, 3 stages": {"per_sm": 2, "stages": 3, "split": True},
    "persistent_split 1/SM, 4 stages": {"per_sm": 1, "stages": 4, "split": True},
}


def one_shape(n: int, k: int, sparsity: float, m: int, block: int) -> dict:
    ops = product_operands(n, k, sparsity, block, m)
    t, x, dy, wp, wm = ops.t, ops.x, ops.dy, ops.wp, ops.wm
    res: dict = {"shape": f"{n}x{k}", "sparsity": sparsity, "tokens": m, "live_blocks": t.nnz}
    products = {
        "fwd": (lambda: x @ wm.T, lambda: bs.forward(x, wp, t, use_tma=True),
                lambda kw: forward_persistent(x, wp, t, **kw)),
        "dgrad": (lambda: dy @ wm, lambda: bs.dgrad(dy, wp, t, use_tma=True),
                  lambda kw: dgrad_persistent(dy, wp, t, **kw)),
    }  # fmt: skip
    for product, (dense, ours, variant) in products.items():
        ref = dense()
        r = res[product] = {"cublas_ms": graph_ms(dense, rep=100), "product_ms": graph_ms(ours, rep=100)}
        for name, kw in VARIANTS.items():
            if product == "dgrad" and kw.get("split"):
                continue
            try:
                err = rel(variant(kw), ref)
                if not err < 2e-2:
                    raise AssertionError(f"relative error {err:.2e}")
                r[name] = graph_ms(lambda kw=kw, variant=variant: variant(kw), rep=100)
            except Exception as e:  # noqa: BLE001 - a variant that fails is a result too
                r[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x2048,3072x768")
    ap.add_argument("--sparsity", default="0,0.75,0.9")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() or bs is None:
        print("kernel_variants.py needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    out = []
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for sp in (float(v) for v in a.sparsity.split(",")):
            r = one_shape(n, k, sp, a.tokens, a.block_size)
            out.append(r)
            for product in ("fwd", "dgrad"):
                p = r[product]
                line = (f"{r['shape']} {sp:g} ({r['live_blocks']} blocks) {product}: "
                        f"product {p['cublas_ms'] / p['product_ms']:.2f}x")
                for name in VARIANTS:
                    if name in p:
                        v = p[name]
                        line += f" | {name} " + (f"{p['cublas_ms'] / v:.2f}x" if isinstance(v, float) else v)
                print(line, flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": triton.__version__, "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
