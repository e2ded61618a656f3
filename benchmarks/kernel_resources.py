"""Compile the block-sparse kernels for Hopper (sm_90) on any machine, GPU or not, and print what
each launch configuration costs a streaming multiprocessor: registers per thread, shared memory,
how deep the TMA pipeline of the main loop is, and so how many programs fit on one SM.

    python benchmarks/kernel_resources.py                  # every config of the three products
    python benchmarks/kernel_resources.py --ttgir DIR      # also keep each kernel's TritonGPU IR

Needs Triton (its bundled ptxas and cuobjdump), not a GPU: it costs no device time. It shows
that the forward and input-gradient kernels pipeline their loads only two deep whatever
``num_stages`` says (64 KB of shared memory at 2, 3 and 4 stages): each step's TMA
coordinates come from an index loaded in the loop. ``pipeline`` below counts the buffers of the
loop's first operand (``ttg.local_alloc`` of ``S x BM x BK``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from sparsetrain.kernels.block_sparse_op import TABLES  # imports no Triton

# H100/H200 per-SM limits: registers, shared memory a kernel may use, threads.
SM_REGISTERS, SM_SHARED, SM_THREADS = 65536, 232448, 2048


def programs_per_sm(regs: int, shared: int, warps: int) -> int:
    threads = 32 * warps
    by_regs = SM_REGISTERS // max(regs * threads, 1)
    by_smem = SM_SHARED // max(shared + 1024, 1)  # the driver reserves 1 KB per program
    return min(by_regs, by_smem, SM_THREADS // threads)


def _signature(kernel, kind: str, bm: int, bk: int, block: int) -> tuple[dict, dict]:
    """Triton's signature of one of the product kernels, read off its argument names: the operands
    are TMA descriptors (their block shapes as each product's pre_hook sets them), the weight
    gradient's output a float32 pointer, the index tables int32 pointers, the rest int32 scalars."""
    blocks = {
        "fwd": {"a": [bm, bk], "w": [block, bk], "out": [bm, block]},
        "dgrad": {"a": [bm, bk], "w": [bk, block], "out": [bm, block]},
        "wgrad": {"a": [bk, block], "w": [bk, block]},
    }[kind]
    consts = {"BR": block, "BC": block, "SPLIT_SIDE": block if kind != "wgrad" else 128, "USE_TMA": True, "BM": bm, "BK": bk}
    if kind == "wgrad":
        consts["DIRECT"] = False
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in blocks:
            sig[name] = f"tensordesc<bf16{blocks[name]}>"
        elif name == "out":
            sig[name] = "*fp32"
        elif name in TABLES:
            sig[name] = "*i32"
        else:
            sig[name] = "i32"
    return sig, consts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--ttgir", default=None, help="a directory for each kernel's TritonGPU IR")
    a = ap.parse_args(argv)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from sparsetrain.kernels import block_sparse as bs
    except ImportError:
        print("kernel_resources.py needs Triton (pip install triton); no GPU is needed", file=sys.stderr)
        return 2
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    kernels = {"fwd": (bs._forward_kernel, bs._MM_CONFIGS), "dgrad": (bs._dgrad_kernel, bs._MM_CONFIGS),
               "wgrad": (bs._wgrad_kernel, bs._WGRAD_CONFIGS)}  # fmt: skip
    print(f"{'product':6} {'BM':>4} {'BK':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'shared':>8} {'pipeline':>8} {'per SM':>6}")
    for kind, (kernel, table) in kernels.items():
        for bm, bk, warps, stages in table:
            sig, consts = _signature(kernel.fn, kind, bm, bk, a.block_size)
            src = ASTSource(fn=kernel.fn, signature=sig, constexprs=consts)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            regs = int(re.search(r"REG:(\d+)", usage).group(1))
            ttgir = k.asm["ttgir"]
            depth = re.search(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)
            shared = k.metadata.shared
            print(f"{kind:6} {bm:>4} {bk:>4} {warps:>5} {stages:>6} {regs:>5} {shared:>8} "
                  f"{depth.group(1) if depth else '-':>8} {programs_per_sm(regs, shared, warps):>6}")  # fmt: skip
            if a.ttgir:
                os.makedirs(a.ttgir, exist_ok=True)
                with open(os.path.join(a.ttgir, f"{kind}_{bm}_{bk}_{warps}_{stages}.ttgir"), "w") as out:
                    out.write(ttgir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
