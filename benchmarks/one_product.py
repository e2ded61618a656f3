"""One block-sparse product, run a few times inside a profiler window: for Nsight Compute.

    ncu --profile-from-start off --set full -o fwd75 python benchmarks/one_product.py --product fwd \
        --shape 8192x2048 --sparsity 0.75

Autotuning (every configuration timed) happens before the window opens
(``cudaProfilerStart``), so the profiler sees only the chosen configuration, ``--repeat`` times,
with cuBLAS's dense product of the same shape once beside it for comparison.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sparsetrain.bench.layer import product_operands

try:  # Triton: GPU machines only
    from sparsetrain.kernels import block_sparse as bs
except ImportError:
    bs = None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--product", choices=("fwd", "dgrad", "wgrad"), default="fwd")
    ap.add_argument("--shape", default="8192x2048", help="weight out x in")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kernel", choices=("triton", "gluon"), default="triton",
                    help="gluon: the ping-pong forward / input gradient (kernels.gluon_block_sparse; sm_90)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() or bs is None:
        print("one_product.py needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    n, k = (int(v) for v in a.shape.split("x"))
    ops = product_operands(n, k, a.sparsity, a.block_size, a.tokens)
    t, x, dy, wp, wm = ops.t, ops.x, ops.dy, ops.wp, ops.wm
    ours = {
        "fwd": lambda: bs.forward(x, wp, t, use_tma=True),
        "dgrad": lambda: bs.dgrad(dy, wp, t, use_tma=True),
        "wgrad": lambda: bs.wgrad(x, dy, t, out_dtype=torch.float32, use_tma=True, packed=True),
    }[a.product]
    if a.kernel == "gluon":
        from sparsetrain.kernels import gluon_block_sparse as gbs

        ours = {"fwd": lambda: gbs.forward(x, wp, t), "dgrad": lambda: gbs.dgrad(dy, wp, t)}[a.product]
    dense = {"fwd": lambda: x @ wm.T, "dgrad": lambda: dy @ wm, "wgrad": lambda: dy.T @ x}[a.product]
    for _ in range(3):  # autotune and cuBLAS warm-up outside the window
        ours()
        dense()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(a.repeat):
        ours()
    dense()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"{a.kernel} {a.product} {a.shape} sparsity {a.sparsity} live blocks {t.nnz}: {a.repeat} launches profiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
