"""``sparsetrain bench layer``: one linear layer, forward + backward, our block-sparse kernels
against cuBLAS dense, torch's BSR kernel and cuSPARSELt 2:4, all in one process (ratios are one
measurement). Run it on your GPU for your model's shapes before choosing a structure:

    sparsetrain bench layer --shapes 8192x2048,2048x8192 --sparsity 0,0.75,0.9 --block_size 128

For each weight shape (out x in) and block sparsity, with ``--tokens`` rows of input, bf16:

- dense      F.linear under bf16 autocast on an fp32 weight (the training setting), forward and
             both backward products (torch.autograd.grad), cuBLAS;
- ours       the same through ``block_sparse_linear`` (live blocks packed from the fp32 weight
             each call, included); ``ours_ptr`` the same with TMA off (pointer loads);
- per product: our forward / input-grad / weight-grad kernels against the dense bf16 products;
- bsr_fwd    torch's ``bsr_dense_mm`` (Triton) on the same layout, forward product only;
- 2:4_fwd    ``to_sparse_semi_structured`` (cuSPARSELt) forward product at 50% (2:4).

Timings are medians of ``triton.testing.do_bench``. The single products are timed over CUDA-graph
replays (``do_bench_cudagraph``: no host launch cost, as under ``compile_mode: reduce-overhead``);
their sum is the "kernels f+b" column. The autograd forward + backward is timed as plain calls
(host launch costs included). Results are checked against the masked dense product (relative
error of the norm) before they are timed. ``--show FILE`` prints the table of a saved ``--json``
(no GPU needed).
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from sparsetrain.bench.timing import GRAPH_FAILURES, bench, rel
from sparsetrain.errors import UserError
from sparsetrain.kernels.block_sparse_op import TABLES, block_sparse_linear
from sparsetrain.kernels.blocks import BlockLayout, layout_to_mask, pack_blocks, unpack_blocks

try:  # --show needs neither Triton nor a GPU
    import triton

    from sparsetrain.kernels import block_sparse as bs
except ImportError:
    triton = bs = None

def random_layout(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    live = rows * cols - round(sparsity * rows * cols)
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(rows * cols, dtype=torch.bool)
    flat[torch.randperm(rows * cols, generator=g)[:live]] = True
    return flat.view(rows, cols)


def weight_layout(n: int, k: int, sparsity: float, block: int, device) -> tuple[torch.Tensor, BlockLayout]:
    """The benchmarks' layout of an ``n x k`` weight: the block grid (an exact count of random
    live blocks, seeded by the shape, so every script times the same pattern) and its tables."""
    grid = random_layout(n // block, k // block, sparsity, seed=n * 7 + k).to(device)
    return grid, BlockLayout.build(grid, (block, block))


def product_operands(n: int, k: int, sparsity: float, block: int, m: int, device="cuda") -> SimpleNamespace:
    """bf16 operands of the three products for the kernel benchmarks: the layout ``t``, ``x``
    ``(m, k)``, ``dy`` ``(m, n)``, the packed live blocks ``wp`` and the masked dense weight ``wm``."""
    _, t = weight_layout(n, k, sparsity, block, device)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    wp = pack_blocks(torch.randn(n, k, device=device), t, torch.bfloat16)
    return SimpleNamespace(t=t, x=x, dy=dy, wp=wp, wm=unpack_blocks(wp, t, torch.bfloat16))


def sweep(shapes: str, sparsities: str, measure, show, json_path: str | None) -> list[dict]:
    """The kernel benchmarks' loop: ``measure(n, k, sparsity)`` for every ``"NxK"`` of ``shapes``
    and every value of ``sparsities`` (both comma separated), ``show`` each result as it comes,
    and rewrite ``json_path`` after every one (a run cut short keeps what it measured)."""
    results: list[dict] = []
    for shape in shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for sp in (float(v) for v in sparsities.split(",")):
            results.append(measure(n, k, sp))
            show(results[-1])
            if json_path:
                with open(json_path, "w") as f:
                    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "results": results}  # fmt: skip
                    json.dump(doc, f, indent=1)
    return results


def with_tma(flag: bool):
    os.environ["SPARSETRAIN_BLOCK_TMA"] = "1" if flag else "0"


def one(n: int, k: int, sparsity: float, block: int, m: int) -> dict:
    dev = "cuda"
    layout, t = weight_layout(n, k, sparsity, block, dev)
    tables = [getattr(t, name) for name in TABLES]
    mask = layout_to_mask(layout, (block, block), (n, k))
    w = (torch.randn(n, k, device=dev) * mask).requires_grad_()
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    def dense_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = F.linear(x, w)
        return torch.autograd.grad(y, (x, w), dy)

    def ours_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block_sparse_linear(x, w, None, tables, (block, block))
        return torch.autograd.grad(y, (x, w), dy)

    out: dict = {"shape": f"{n}x{k}", "sparsity": sparsity, "block": block, "tokens": m, "live_blocks": t.nnz}
    # correctness first (fresh data per shape), against the masked dense products
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref = F.linear(x, w)
        y = block_sparse_linear(x, w, None, tables, (block, block))
    gx_ref, gw_ref = dense_step()
    gw_ref = gw_ref * mask  # the dense product's weight gradient, on the live blocks
    gx, gw = ours_step()
    out["rel_err"] = max(rel(y, y_ref), rel(gx, gx_ref), rel(gw, gw_ref)) if t.nnz else float((y != 0).sum())
    assert out["rel_err"] < 2e-2, out

    # Through autograd, plain calls (capturing torch.autograd.grad in a graph failed on the H200,
    # torch 2.11): host launch costs included, which bound ours on small shapes.
    out["dense_ms"] = bench(dense_step, graph=False)
    with_tma(True)
    out["ours_ms"] = bench(ours_step, graph=False)
    with_tma(False)
    out["ours_ptr_ms"] = bench(ours_step, graph=False)
    with_tma(True)

    # per product, bf16 operands on both sides
    wb = w.detach().bfloat16()
    xd = x.detach()
    wp = pack_blocks(w.detach(), t, torch.bfloat16)
    use_tma = bs.tma_available(torch.device(dev))
    out["fwd_dense_ms"] = bench(lambda: xd @ wb.T)
    out["fwd_ours_ms"] = bench(lambda: bs.forward(xd, wp, t, use_tma=use_tma))
    out["dgrad_dense_ms"] = bench(lambda: dy @ wb)
    out["dgrad_ours_ms"] = bench(lambda: bs.dgrad(dy, wp, t, use_tma=use_tma))
    out["wgrad_dense_ms"] = bench(lambda: dy.T @ xd)
    out["wgrad_ours_ms"] = bench(lambda: bs.wgrad(xd, dy, t, out_dtype=torch.float32, use_tma=use_tma))
    out["pack_ms"] = bench(lambda: bs.pack(w.detach(), t, torch.bfloat16))
    # torch's BSR (Triton) forward: Y^T = W_bsr X^T
    try:
        from torch.sparse._triton_ops import bsr_dense_mm

        w_bsr = wb.to_sparse_bsr((block, block))
        xt = xd.T.contiguous()
        y_bsr = bsr_dense_mm(w_bsr, xt)
        assert rel(y_bsr.T, xd @ wb.T) < 2e-2
        out["bsr_fwd_ms"] = bench(lambda: bsr_dense_mm(w_bsr, xt), graph=False)
    except Exception as e:  # noqa: BLE001 - report, do not stop the table
        out["bsr_fwd_ms"] = None
        out["bsr_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def two_four(n: int, k: int, m: int) -> dict:
    """cuSPARSELt 2:4 forward product against dense, same shape."""
    from torch.sparse import to_sparse_semi_structured

    dev = "cuda"
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    keep = w.view(n, k // 4, 4).abs().argsort(dim=-1, descending=True)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=dev).scatter_(-1, keep, True).view(n, k)
    w = w * mask
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    out = {"shape": f"{n}x{k}", "tokens": m}
    try:
        ws = to_sparse_semi_structured(w)
        assert rel(F.linear(x, ws), F.linear(x, w)) < 2e-2
        out["dense_fwd_ms"] = bench(lambda: F.linear(x, w), graph=False)
        out["2:4_fwd_ms"] = bench(lambda: F.linear(x, ws), graph=False)
    except Exception as e:  # noqa: BLE001
        out["2:4_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def main_bench_layer(args) -> int:
    if args.show:
        try:
            with open(args.show) as f:
                saved = json.load(f)
            saved["rows"], saved["two_four"]  # noqa: B018 - the keys print_table reads
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--show {args.show}: not a saved bench layer result ({e})") from None
        print_table(saved)
        return 0
    if not torch.cuda.is_available() or triton is None:
        raise UserError(
            "bench layer: needs a CUDA GPU and Triton (found: "
            f"{'CUDA' if torch.cuda.is_available() else 'no CUDA'}, {'Triton' if triton else 'no Triton'})"
        )
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
        sparsities = [float(v) for v in args.sparsity.split(",")]
    except ValueError:
        raise UserError(f"--shapes {args.shapes!r} / --sparsity {args.sparsity!r}: expected e.g. 8192x2048,2048x8192 and 0.75,0.9") from None
    for n, k in shapes:
        if n % args.block_size or k % args.block_size:
            raise UserError(f"--shapes: {n}x{k} is not a multiple of --block_size {args.block_size}")
    if not all(0.0 <= s < 1.0 for s in sparsities):
        raise UserError(f"--sparsity {args.sparsity!r}: each value must be in [0, 1)")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows, extra = [], []
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "tokens": args.tokens, "block": args.block_size, "command": " ".join(sys.argv),
              "rows": rows, "two_four": extra}

    def save() -> None:  # after every row: a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    for n, k in shapes:
        for s in sparsities:
            rows.append(one(n, k, s, args.block_size, args.tokens))
            print(json.dumps(rows[-1]), flush=True)
            save()
        extra.append(two_four(n, k, args.tokens))
        print(json.dumps(extra[-1]), flush=True)
        save()
    print_table(result)
    return 0


def kernel_totals(r: dict) -> tuple[float, float]:
    """(dense, ours) ms of the three products from graph replays; ours includes packing."""
    dense = r["fwd_dense_ms"] + r["dgrad_dense_ms"] + r["wgrad_dense_ms"]
    return dense, r["fwd_ours_ms"] + r["dgrad_ours_ms"] + r["wgrad_ours_ms"] + r["pack_ms"]


def print_table(res: dict) -> None:
    rows = res["rows"]
    tokens = res.get("tokens", rows[0]["tokens"] if rows else "?")
    block = res.get("block", rows[0]["block"] if rows else "?")
    print(f"\n{res['gpu']}  torch {res['torch']}  triton {res['triton']}  tokens {tokens}  block {block}  bf16; "
          "speedup = dense time / ours")
    print("kernels f+b: forward + input grad + weight grad (+ packing for ours), each timed over CUDA-graph "
          "replays; autograd f+b: one forward and backward through autograd, plain calls (host costs included)")
    print(f"{'shape':>10} {'sparsity':>8} {'kernels f+b':>11} {'fwd':>6} {'dgrad':>6} {'wgrad':>6} "
          f"{'autograd f+b':>12} {'no TMA':>7} {'torch bsr fwd':>13} {'err':>8}")
    for r in rows:
        def sp(a, b, r=r):
            return f"{r[a] / r[b]:.2f}x" if r.get(a) and r.get(b) else "-"

        dense, ours = kernel_totals(r)
        print(f"{r['shape']:>10} {r['sparsity']:>8.2f} {dense / ours:>10.2f}x {sp('fwd_dense_ms', 'fwd_ours_ms'):>6} "
              f"{sp('dgrad_dense_ms', 'dgrad_ours_ms'):>6} {sp('wgrad_dense_ms', 'wgrad_ours_ms'):>6} "
              f"{sp('dense_ms', 'ours_ms'):>12} {sp('dense_ms', 'ours_ptr_ms'):>7} "
              f"{sp('fwd_dense_ms', 'bsr_fwd_ms'):>13} {r['rel_err']:>8.1e}")
    if GRAPH_FAILURES:
        print("CUDA-graph capture failed (timed as plain calls):", "; ".join(GRAPH_FAILURES))
    for e in res["two_four"]:
        if "2:4_fwd_ms" in e:
            print(f"2:4 (cuSPARSELt) forward {e['shape']}: {e['dense_fwd_ms'] / e['2:4_fwd_ms']:.2f}x dense")
        else:
            print(f"2:4 {e['shape']}: {e.get('2:4_error')}")
