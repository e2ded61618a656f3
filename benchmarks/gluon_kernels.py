"""The Gluon ping-pong kernels (kernels/gluon_block_sparse.py) against the Triton product kernels
and cuBLAS, forward and input gradient, one process (issue 19).

    PYTHONPATH=src python benchmarks/gluon_kernels.py --shapes 8192x2048,2048x8192,3072x768 \\
        --sparsity 0,0.75,0.9 --variants default,unordered --json FILE

First the oracle: for each variant, fresh random bf16 (and one fp16) inputs against the masked
dense product in float64 (``||out - ref|| / ||ref||`` under 1e-2), the output poisoned with NaN
first, odd token counts, a layout with an empty and a full block-row and block-column. A variant
that fails is dropped from the timings (and reported). Then, per shape and sparsity at
``--tokens`` rows: cuBLAS (``x @ Wm^T`` / ``dy @ Wm`` on the masked dense weight), the Triton
kernel (``block_sparse.forward`` / ``dgrad``, autotuned) and every variant, each the median of
CUDA-graph replays (``do_bench_cudagraph``). Speedups are cuBLAS time / kernel time.

Variants (``--variants``, comma separated, names of ``VARIANTS``): ``default`` is
``gluon_block_sparse.CONFIG``; the others change one knob (ring depth, K step). ``ORDERED=False``
(the two consumers' MMAs not handed over in turn) is not a variant: with one shared ring a
consumer can then wait on a slot more than one phase ahead, which a parity wait cannot tell
from an old phase (it hung on the first call, 2026-12-03).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sparsetrain.bench.layer import product_operands
from sparsetrain.bench.timing import graph_ms, rel
from sparsetrain.kernels import block_sparse as bs
from sparsetrain.kernels import gluon_block_sparse as gb
from sparsetrain.kernels.blocks import BlockLayout, pack_blocks, unpack_blocks

VARIANTS = {
    "default": {},
    "late_turn": {"EARLY_TURN": False},
    "stages5": {"STAGES": 5},
    "stages3": {"STAGES": 3},
    "bk128": {"BK": 128, "STAGES": 2},
}


def config(name: str) -> dict:
    return {**gb.CONFIG, **VARIANTS[name]}


def _poisoned_run(fn, shape, dtype):
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    fn(out)
    return out


def check(name: str) -> list[str]:
    """The oracle cases for one variant; returns the failures (empty: passed)."""
    cfg, failures = config(name), []
    g = torch.Generator().manual_seed(1234)
    cases = [  # (n, k, m, density, dtype, special)
        (512, 384, 1000, 0.5, torch.bfloat16, False),
        (384, 640, 129, 0.3, torch.bfloat16, False),
        (256, 256, 77, 1.0, torch.float16, False),
        (640, 512, 4099, 0.4, torch.bfloat16, True),
        (8192, 2048, 16384 - 37, 0.25, torch.bfloat16, False),
    ]
    for n, k, m, density, dtype, special in cases:
        grid = torch.rand(n // 128, k // 128, generator=g) < density
        if special:  # block-row 0 and block-column 2 empty; row 1 and column 3 full (but column 2)
            grid[1], grid[:, 3] = True, True
            grid[0], grid[:, 2] = False, False
        t = BlockLayout.build(grid.cuda(), (128, 128))
        w = torch.randn(n, k, device="cuda")
        wp = pack_blocks(w, t, dtype)
        wm = unpack_blocks(wp, t, torch.float64)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        dy = torch.randn(m, n, device="cuda", dtype=dtype)
        y = _poisoned_run(lambda o, x=x, wp=wp, t=t: gb._run(x, wp, o, t, True, cfg), (m, n), dtype)
        dx = _poisoned_run(lambda o, dy=dy, wp=wp, t=t: gb._run(dy, wp, o, t, False, cfg), (m, k), dtype)
        torch.cuda.synchronize()
        for what, got, ref in (("fwd", y, x.double() @ wm.T), ("dgrad", dx, dy.double() @ wm)):
            err = rel(got, ref) if ref.norm() > 0 else float(got.abs().sum())
            bad = bool(torch.isnan(got).any()) or not err < 1e-2
            if special and not bad:  # the empty row / column of the output is exactly zero
                zero = got[:, :128] if what == "fwd" else got[:, 256:384]
                bad = bool(zero.abs().sum() != 0)
            if bad:
                failures.append(f"{name} {what} {n}x{k} m={m} density={density} {dtype}: rel err {err:.2e}, "
                                f"nan {int(torch.isnan(got).sum())}")
    return failures


def measure(n: int, k: int, sp: float, tokens: int, variants: list[str]) -> dict:
    op = product_operands(n, k, sp, 128, tokens)
    r = {"shape": f"{n}x{k}", "sparsity": sp, "tokens": tokens, "live_blocks": op.t.nnz}
    r["fwd_cublas_ms"] = graph_ms(lambda: op.x @ op.wm.T)
    r["dgrad_cublas_ms"] = graph_ms(lambda: op.dy @ op.wm)
    r["fwd_triton_ms"] = graph_ms(lambda: bs.forward(op.x, op.wp, op.t, use_tma=True))
    r["dgrad_triton_ms"] = graph_ms(lambda: bs.dgrad(op.dy, op.wp, op.t, use_tma=True))
    y_ref, dx_ref = op.x @ op.wm.T, op.dy @ op.wm
    for v in variants:
        cfg = config(v)
        y = gb.forward(op.x, op.wp, op.t, cfg)
        dx = gb.dgrad(op.dy, op.wp, op.t, cfg)
        r[f"{v}_rel_err"] = max(rel(y, y_ref), rel(dx, dx_ref))
        r[f"fwd_{v}_ms"] = graph_ms(lambda cfg=cfg: gb.forward(op.x, op.wp, op.t, cfg))
        r[f"dgrad_{v}_ms"] = graph_ms(lambda cfg=cfg: gb.dgrad(op.dy, op.wp, op.t, cfg))
    r["fwd_triton_again_ms"] = graph_ms(lambda: bs.forward(op.x, op.wp, op.t, use_tma=True))  # the spread
    return r


def show(r: dict, variants: list[str]) -> None:
    def x(prod, who):
        return r[f"{prod}_cublas_ms"] / r[f"{prod}_{who}_ms"]

    cells = "  ".join(f"{v} {x('fwd', v):.2f}x/{x('dgrad', v):.2f}x" for v in variants)
    print(f"{r['shape']:>10} {r['sparsity']:4.2f}  cuBLAS {r['fwd_cublas_ms']:.3f}/{r['dgrad_cublas_ms']:.3f} ms  "
          f"triton {x('fwd', 'triton'):.2f}x/{x('dgrad', 'triton'):.2f}x (again {x('fwd', 'triton_again'):.2f}x)  "
          f"{cells}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x2048,2048x8192,3072x768")
    ap.add_argument("--sparsity", default="0,0.75,0.9")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--variants", default="default,stages5")
    ap.add_argument("--check_only", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    variants = a.variants.split(",")
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
           "checks": {}, "rows": []}  # fmt: skip

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)

    for v in list(variants):
        failures = check(v)
        doc["checks"][v] = failures or "passed"
        print(f"oracle {v}: {'passed' if not failures else failures}", flush=True)
        if failures:
            variants.remove(v)
    save()
    if a.check_only or not variants:
        return 0 if variants else 1
    print("forward / input-gradient speedup over cuBLAS on the masked dense weight (CUDA-graph medians)")
    for shape in a.shapes.split(","):
        n, k = (int(s) for s in shape.split("x"))
        for sp in (float(s) for s in a.sparsity.split(",")):
            doc["rows"].append(measure(n, k, sp, a.tokens, variants))
            show(doc["rows"][-1], variants)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
