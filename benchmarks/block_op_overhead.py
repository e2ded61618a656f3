"""Host-side cost of one block-sparse linear call (forward, forward + backward), and a cProfile
of the forward + backward loop: for shapes whose GPU work is shorter than the launch path.

    python benchmarks/block_op_overhead.py --shape 768x768 --sparsity 0.75
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from sparsetrain.kernels import block_sparse as bs
from sparsetrain.kernels.block_sparse_op import TABLES, block_sparse_linear, block_sparse_mm
from sparsetrain.kernels.blocks import BlockLayout


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="768x768")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block", type=int, default=128)
    a = ap.parse_args()
    n, k = (int(v) for v in a.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    layout = (torch.rand(n // a.block, k // a.block, generator=g) >= a.sparsity).cuda()
    t = BlockLayout.build(layout, (a.block, a.block))
    tables = [getattr(t, name) for name in TABLES]
    w = torch.randn(n, k, device="cuda", requires_grad=True)
    x = torch.randn(a.tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(a.tokens, n, device="cuda", dtype=torch.bfloat16)
    wp = bs.pack(w.detach(), t, torch.bfloat16)
    blk = (a.block, a.block)

    def fwd_kernel():
        bs.forward(x.detach(), wp, t, use_tma=True)

    def fwd_op():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            block_sparse_linear(x, w, None, tables, blk)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block_sparse_linear(x, w, None, tables, blk)
        torch.autograd.grad(y, (x, w), dy)

    def step_custom_op():  # the path torch.compile takes, called eagerly
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = block_sparse_mm(x, w, tables, *blk)
        torch.autograd.grad(y, (x, w), dy)

    def dense():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(x, w)
        torch.autograd.grad(y, (x, w), dy)

    for name, fn in (("forward kernel", fwd_kernel), ("forward op", fwd_op), ("fwd+bwd op", step), ("fwd+bwd custom op", step_custom_op), ("dense fwd+bwd", dense)):
        print(f"{name:<16} {per_call_us(fn):9.1f} us per call (wall, synchronized)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    from torch.profiler import ProfilerActivity, profile

    for fn in (step, step_custom_op):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
