"""Where the eager block-sparse step's time goes (issue 19): one layer, forward + both gradients
through autograd as a library user's loop calls it, against the same step replayed from a CUDA
graph and against dense, in one process.

    PYTHONPATH=src python benchmarks/eager_overhead.py --shapes 8192x2048,3072x768 --sparsity 0.75,0.9 \\
        --json OUT.json [--profile] [--cprofile]

Per shape and sparsity (``--tokens`` rows, bf16 autocast over an fp32 weight, 128x128 blocks):

- ``eager_ms``: back-to-back plain calls of the autograd step, timed over the loop (what a training
  loop without graphs sees); ``graph_ms``: the same step captured once in a CUDA graph and replayed;
  ``dense_ms`` / ``dense_graph_ms``: ``F.linear`` the same two ways;
- ``host_us``: the host time of one eager step, from the same loop at ``--host_tokens`` rows (GPU
  work far shorter than the launches, so the loop's wall time is the host's);
- ``eager_ms_triton_launch`` / ``host_us_triton_launch``: the same two with every kernel call
  through Triton's own launch path (``SPARSETRAIN_TRITON_LAUNCH=triton``: ``kernels.launch`` off);
- with ``--profile``: the GPU kernels of one eager step (torch.profiler): their count, their
  summed time, and the gap between summed kernel time and the step's wall time;
- with ``--cprofile``: the Python functions the host time goes to (cProfile, tiny rows).

Ratios are within one process; each timing is the median of ``--repeats`` loops.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from sparsetrain.bench.layer import random_layout
from sparsetrain.kernels.block_sparse_op import TABLES, block_sparse_linear
from sparsetrain.kernels.blocks import BlockLayout, layout_to_mask


def make_steps(n: int, k: int, sparsity: float, block: int, m: int):
    """(dense_step, ours_step, live blocks): each step one forward and both gradients."""
    grid = random_layout(n // block, k // block, sparsity, seed=n * 7 + k).cuda()
    t = BlockLayout.build(grid, (block, block))
    tables = [getattr(t, name) for name in TABLES]
    mask = layout_to_mask(grid, (block, block), (n, k))
    w = (torch.randn(n, k, device="cuda") * mask).requires_grad_()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    # cache_enabled=False: autocast's cast cache cannot live across a CUDA-graph capture
    def dense_step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = F.linear(x, w)
        return torch.autograd.grad(y, (x, w), dy)

    def ours_step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = block_sparse_linear(x, w, None, tables, (block, block))
        return torch.autograd.grad(y, (x, w), dy)

    return dense_step, ours_step, t.nnz


def loop_ms(fn, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of (wall time of ``iters`` back-to-back calls) / ``iters``."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def graphed(fn):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def kernel_profile(fn, steps: int = 10) -> dict:
    """The CUDA kernels of ``steps`` calls: per step their count, summed time and names."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e6
    kernels: dict[str, list[float]] = {}
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(e.name, []).append(e.device_time)
    per = {name[:90]: {"count": len(v) / steps, "us": sum(v) / steps} for name, v in kernels.items()}
    return {
        "wall_us_profiled": wall,
        "kernels_per_step": sum(d["count"] for d in per.values()),
        "kernel_us": sum(d["us"] for d in per.values()),
        "kernels": dict(sorted(per.items(), key=lambda kv: -kv[1]["us"])),
    }


def python_profile(fn, calls: int = 300, top: int = 30, warmup: int = 10, sorts: tuple[str, ...] = ("tottime",)) -> str:
    """cProfile of ``calls`` calls of ``fn`` after ``warmup`` (CUDA synchronised around), one
    listing per order in ``sorts`` (by own time by default; "cumulative" shows whose callees cost)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    for order in sorts:
        pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(top)
    return buf.getvalue()


@contextlib.contextmanager
def triton_launch():
    """Every kernel call through ``kernel[grid](...)``, as before ``kernels.launch`` existed."""
    os.environ["SPARSETRAIN_TRITON_LAUNCH"] = "triton"
    try:
        yield
    finally:
        del os.environ["SPARSETRAIN_TRITON_LAUNCH"]


def one(n: int, k: int, sp: float, a) -> dict:
    dense_step, ours_step, nnz = make_steps(n, k, sp, a.block, a.tokens)
    r = {"shape": f"{n}x{k}", "sparsity": sp, "tokens": a.tokens, "live_blocks": nnz}
    for _ in range(3):  # autotuning, compilation
        ours_step()
        dense_step()
    r["dense_ms"] = loop_ms(dense_step, a.iters, a.repeats)
    r["eager_ms"] = loop_ms(ours_step, a.iters, a.repeats)
    for name, fn in (("dense_graph_ms", dense_step), ("graph_ms", ours_step)):
        try:
            r[name] = loop_ms(graphed(fn), a.iters, a.repeats)
        except Exception as e:  # noqa: BLE001 - report, keep the row
            r[name] = None
            r[name.replace("_ms", "_error")] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            torch.cuda.synchronize()
    r["eager_ms_again"] = loop_ms(ours_step, a.iters, a.repeats)  # the spread of one figure
    if a.profile:
        r["profile"] = kernel_profile(ours_step)
        r["dense_profile"] = kernel_profile(dense_step)
    _, tiny_step, _ = make_steps(n, k, sp, a.block, a.host_tokens)
    for _ in range(3):
        tiny_step()
    r["host_us"] = loop_ms(tiny_step, 200, a.repeats) * 1e3
    with triton_launch():  # the same steps through Triton's own launch path (kernels.launch off)
        r["eager_ms_triton_launch"] = loop_ms(ours_step, a.iters, a.repeats)
        r["host_us_triton_launch"] = loop_ms(tiny_step, 200, a.repeats) * 1e3
    if a.cprofile:
        r["cprofile"] = python_profile(tiny_step)
    return r


def show(r: dict) -> None:
    def x(a, b):
        return f"{r[a] / r[b]:.2f}x" if r.get(a) and r.get(b) else "-"

    print(f"{r['shape']:>10} {r['sparsity']:>5.2f}  dense {r['dense_ms']:.3f} ms  eager {r['eager_ms']:.3f} "
          f"(again {r['eager_ms_again']:.3f})  graph {r['graph_ms'] or float('nan'):.3f}  "
          f"eager/graph {x('eager_ms', 'graph_ms')}  dense/eager {x('dense_ms', 'eager_ms')}  "
          f"dense/graph {x('dense_ms', 'graph_ms')}  host {r['host_us']:.0f} us", flush=True)
    print(f"{'':>17} through Triton's launch path: eager {r['eager_ms_triton_launch']:.3f} ms, "
          f"host {r['host_us_triton_launch']:.0f} us", flush=True)
    if "profile" in r:
        p = r["profile"]
        print(f"{'':>17} kernels/step {p['kernels_per_step']:.0f}, kernel time {p['kernel_us']:.0f} us, "
              f"wall (profiled) {p['wall_us_profiled']:.0f} us", flush=True)
        for name, d in list(p["kernels"].items())[:8]:
            print(f"{'':>20} {d['count']:4.1f} x {d['us']:8.1f} us  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x2048,3072x768")
    ap.add_argument("--sparsity", default="0.75,0.9")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--host_tokens", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for sp in (float(v) for v in a.sparsity.split(",")):
            rows.append(one(n, k, sp, a))
            show(rows[-1])
            if a.json:
                with open(a.json, "w") as f:
                    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    for r in rows:
        if "cprofile" in r:
            print(f"\n== cProfile, {r['shape']} {r['sparsity']}, {a.host_tokens} rows, 300 steps ==")
            print(r["cprofile"])
            break


if __name__ == "__main__":
    main()
