"""Every candidate launch configuration of the block-sparse kernels, timed one by one against
cuBLAS in one process: which tile shape, warp count and pipeline depth wins per product, shape
and sparsity, with each kernel's shared memory and registers. Feeds the autotune tables in
``src/sparsetrain/kernels/block_sparse.py`` (docs/block_kernels.md says what the sweeps decided;
figures in BENCHMARKS.md, raw runs in benchmarks/results/kernel_configs.jsonl).

    python benchmarks/kernel_configs.py --shapes 8192x2048,3072x768 --sparsity 0,0.75,0.9 --json out.json

Each configuration is launched directly (no autotuner), its output checked against the
masked dense product, then timed over CUDA-graph replays (median of ``do_bench_cudagraph``). A
configuration that does not compile or does not fit is listed with its error. The weight-gradient
part also sweeps the number of M slices (``--slices``) with the product's autotuner; the slice
count ``kernels/wgrad_slices.py`` would pick is printed as the default.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sparsetrain.bench.layer import product_operands, sweep
from sparsetrain.bench.timing import graph_ms, rel
from sparsetrain.kernels.blocks import BlockLayout, pack_blocks

try:  # Triton: GPU machines only
    import triton

    from sparsetrain.kernels import block_sparse as bs
except ImportError:
    triton = bs = None

# (BM, BK, warps, stages). The 2026-11-28 sweeps (docs/block_kernels.md) also tried Triton's
# warp specialisation (128-row tiles with 4 warps do not compile with host TMA descriptors in
# Triton 3.6; what compiled was slower) and plain stores in place of TMA stores (0-5% slower);
# both knobs were then taken out of the kernels (their code: commit 2a5ca70).
MM = [
    (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4),
    (64, 64, 4, 6), (128, 32, 4, 4), (128, 32, 4, 6), (256, 64, 8, 3), (128, 128, 8, 3),
]
WGRAD = [(64, 64, 4, 4), (64, 64, 8, 4), (64, 128, 4, 3), (64, 128, 8, 3), (64, 32, 4, 6), (64, 64, 4, 3), (64, 64, 8, 3)]


def timed(fn) -> float:
    return graph_ms(fn, rep=100)


def launch(kind: str, cfg, a, w, out, t: BlockLayout, m: int, slices: int = 1):
    """One direct launch of the product kernel ``kind`` with configuration ``cfg``."""
    bm, bk, warps, stages = cfg
    (n, k), (br, bc) = t.shape, t.block
    da, dw = bs._desc(a, True), bs._desc(w, True)
    meta = {"BR": br, "BC": bc, "USE_TMA": True, "BM": bm, "BK": bk, "num_warps": warps, "num_stages": stages}
    if kind == "wgrad":
        do = out
        bs._set_blocks(kind)({"a": da, "w": dw, "out": do, **meta})
        per = triton.cdiv(triton.cdiv(m, slices), 128) * 128
        return bs._wgrad_kernel.fn[(t.nnz, triton.cdiv(m, per))](
            da, dw, do, t.blk_rows, t.row_cols, m, n, k, t.nnz, a.stride(0), w.stride(0), per,
            SPLIT_SIDE=128, DIRECT=False, **meta,
        )  # fmt: skip
    do = bs._desc(out, True)
    bs._set_blocks(kind)({"a": da, "w": dw, "out": do, **meta})
    if kind == "fwd":
        grid = (triton.cdiv(m, bm) * (n // br),)
        return bs._forward_kernel.fn[grid](
            da, dw, do, t.row_ptr, t.row_cols, m, n, k, t.nnz, a.stride(0), out.stride(0), SPLIT_SIDE=bc, **meta
        )
    else:
        grid = (triton.cdiv(m, bm) * (k // bc),)
        return bs._dgrad_kernel.fn[grid](
            da, dw, do, t.col_ptr, t.col_rows, t.col_ids, m, n, k, t.nnz, a.stride(0), out.stride(0),
            SPLIT_SIDE=br, **meta,
        )  # fmt: skip


def one_shape(n: int, k: int, sparsity: float, m: int, block: int, slices_list: list[int]) -> dict:
    dev = "cuda"
    ops = product_operands(n, k, sparsity, block, m, dev)
    t, x, dy, wp, wm = ops.t, ops.x, ops.dy, ops.wp, ops.wm
    w2 = wp.view(-1, block)
    refs = {"fwd": x @ wm.T, "dgrad": dy @ wm, "wgrad": None}
    dense = {"fwd": timed(lambda: x @ wm.T), "dgrad": timed(lambda: dy @ wm), "wgrad": timed(lambda: dy.T @ x)}
    res: dict = {"shape": f"{n}x{k}", "sparsity": sparsity, "tokens": m, "live_blocks": t.nnz, "dense_ms": dense}
    gw_ref = pack_blocks((dy.T.float() @ x.float()), t, torch.float32)
    for kind, table in (("fwd", MM), ("dgrad", MM), ("wgrad", WGRAD)):
        rows = []
        for cfg in table:
            try:
                if kind == "wgrad":
                    s = bs._slices(m, t.nnz, x.device)
                    out = torch.zeros(s, t.nnz, block, block, device=dev)  # slices past M stay 0

                    def fn(cfg=cfg, out=out, s=s):
                        return launch("wgrad", cfg, dy, x, out, t, m, s)

                    compiled = fn()
                    err = rel(out.sum(0), gw_ref)
                else:
                    a = x if kind == "fwd" else dy
                    out = torch.empty(m, n if kind == "fwd" else k, device=dev, dtype=torch.bfloat16)

                    def fn(kind=kind, cfg=cfg, a=a, out=out):
                        return launch(kind, cfg, a, w2, out, t, m)

                    compiled = fn()
                    err = rel(out, refs[kind])
                if not err < 2e-2:
                    raise AssertionError(f"relative error {err:.2e}")
                ms = timed(fn)
                rows.append({"config": list(cfg), "ms": ms, "speedup": dense[kind] / ms,
                             "shared_bytes": getattr(getattr(compiled, "metadata", None), "shared", None),
                             "registers": getattr(compiled, "n_regs", None)})
            except Exception as e:  # noqa: BLE001 - a config that fails is a result too
                rows.append({"config": list(cfg), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"})
            torch.cuda.synchronize()
        res[kind] = rows
    sweep = []
    real = bs._slices
    try:
        for s in slices_list:
            bs._slices = lambda m_, nnz_, d_, s=s: s
            ms = timed(lambda: bs.wgrad(x, dy, t, out_dtype=torch.float32, use_tma=True, packed=True))
            sweep.append({"slices": s, "programs": s * t.nnz, "ms": ms, "speedup": dense["wgrad"] / ms})
    finally:
        bs._slices = real
    res["wgrad_slices"] = sweep
    res["wgrad_default_slices"] = real(m, t.nnz, x.device)
    return res


def show(res: list[dict]) -> None:
    for r in res:
        print(f"\n{r['shape']}  sparsity {r['sparsity']}  live blocks {r['live_blocks']}  "
              f"cuBLAS ms fwd {r['dense_ms']['fwd']:.3f} dgrad {r['dense_ms']['dgrad']:.3f} wgrad {r['dense_ms']['wgrad']:.3f}")
        for kind in ("fwd", "dgrad", "wgrad"):
            ok = sorted((x for x in r[kind] if "ms" in x), key=lambda x: x["ms"])
            line = "  ".join(f"{tuple(x['config'])}:{x['speedup']:.2f}x smem {x['shared_bytes']} "
                             f"regs {x['registers']}" for x in ok[:6])
            print(f"  {kind:6s} best: {line}")
            bad = [x for x in r[kind] if "error" in x]
            for x in bad:
                print(f"  {kind:6s} failed {tuple(x['config'])}: {x['error']}")
        print(f"  wgrad slices (default {r['wgrad_default_slices']}): "
              + "  ".join(f"S={x['slices']}:{x['speedup']:.2f}x" for x in r["wgrad_slices"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x2048,2048x8192,3072x768")
    ap.add_argument("--sparsity", default="0,0.75,0.9")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--slices", default="1,2,3,4,6,9,12,16")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() or bs is None:
        print("kernel_configs.py needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    slices = [int(v) for v in a.slices.split(",")]
    sweep(a.shapes, a.sparsity, lambda n, k, sp: one_shape(n, k, sp, a.tokens, a.block_size, slices),
          lambda r: show([r]), a.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
