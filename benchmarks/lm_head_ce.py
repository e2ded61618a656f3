"""The LM head and its cross-entropy, forward + backward, computed whole against chunked (issue 19:
"a chunked fused cross-entropy", the largest dense part of a GPT-2-small step), one process.

    PYTHONPATH=src python benchmarks/lm_head_ce.py --tokens 16384 --hidden 768 --vocab 50304 \\
        --chunks 1,2,4,8 [--json OUT.json]

- ``whole``: ``F.cross_entropy(F.linear(h, W), t)`` under bf16 autocast, ``torch.compile``d (what
  our model and the plain-loop reference both run): the (tokens, vocab) logits are written, read
  by the loss, and their gradient written and read by the two gradient products.
- ``chunked C``: the same loss in C slices of rows, each slice's gradient computed in the forward
  (logits, log-sum-exp, softmax minus one-hot in place, then dH and the dW contribution), so no
  (tokens, vocab) tensor outlives its slice; the backward only scales the saved gradients. The
  slice's element-wise part is ``torch.compile``d; dW accumulates in fp32.

Prints per variant the time of one forward + backward (median of CUDA-event timings), peak memory
above the inputs, and the largest difference of loss and gradients from ``whole``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F


def whole_loss(h, w, t):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return F.cross_entropy(F.linear(h, w).float(), t)


@torch.compile(dynamic=False)
def _slice_grad(logits, t, scale):
    """(summed loss of the slice, d loss / d logits in bf16) for a mean over all tokens."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, t[:, None]).squeeze(1)
    g = torch.softmax(z, dim=-1)
    g.scatter_add_(1, t[:, None], torch.full_like(picked[:, None], -1.0))
    return (lse - picked).sum(), (g * scale).to(torch.bfloat16)


class ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, t, chunks):
        wb = w.to(torch.bfloat16)
        hb = h.to(torch.bfloat16)
        scale = 1.0 / t.numel()
        dh = torch.empty_like(hb)
        dw = torch.zeros_like(w, dtype=torch.float32)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        for rows in torch.arange(t.numel(), device="cpu").chunk(chunks):
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            part, g = _slice_grad(hb[lo:hi] @ wb.T, t[lo:hi], scale)
            loss += part
            torch.matmul(g, wb, out=dh[lo:hi])
            dw.add_(g.T @ hb[lo:hi])
        ctx.save_for_backward(dh, dw)
        return loss * scale

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return (dh * grad).to(dh.dtype), (dw * grad), None, None


def time_ms(fn, repeats=20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    h = (torch.randn(a.tokens, a.hidden, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, device="cuda") * 0.02).requires_grad_()
    t = torch.randint(0, a.vocab, (a.tokens,), device="cuda")
    compiled = torch.compile(whole_loss)
    rows = []

    def run(name, loss_fn):
        def step():
            h.grad = w.grad = None
            loss_fn().backward()
            return h.grad, w.grad

        ms = time_ms(step)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = loss_fn()
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        rows.append({"variant": name, "ms": ms, "peak_extra_bytes": peak, "loss": loss.item(),
                     "dh": h.grad.float().clone(), "dw": w.grad.clone()})

    run("whole", lambda: compiled(h, w, t))
    for c in (int(v) for v in a.chunks.split(",")):
        run(f"chunked {c}", lambda c=c: ChunkedLinearCE.apply(h, w, t, c))
    ref = rows[0]
    print(f"LM head + cross-entropy, {a.tokens} tokens x {a.hidden} -> {a.vocab}, {torch.cuda.get_device_name()}")
    for r in rows:
        r["max_loss_diff"] = abs(r["loss"] - ref["loss"])
        r["max_dh_diff"] = (r.pop("dh") - ref["dh"]).abs().max().item() if r is not ref else 0.0
        r["max_dw_diff"] = (r.pop("dw") - ref["dw"]).abs().max().item() if r is not ref else 0.0
        r["time_over_whole"] = r["ms"] / ref["ms"]
        print(f"{r['variant']:<12} {r['ms']:8.3f} ms  {r['time_over_whole']:.3f}x  peak +{r['peak_extra_bytes'] / 2**30:.2f} GiB"
              f"  |dloss| {r['max_loss_diff']:.2e}  |ddh| {r['max_dh_diff']:.2e}  |ddw| {r['max_dw_diff']:.2e}")
    ref.pop("dh", None)
    ref.pop("dw", None)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(a), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
