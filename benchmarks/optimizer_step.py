"""Optimizer step alone on an H200: torch fused AdamW (dense), the sparsifier around it, and PackedOptimizer.

    PYTHONPATH=src python benchmarks/optimizer_step.py

GPT-2 small's block matrices (12 x q/k/v/output/ffn 0/ffn 1, the model's names, fp32, 85M weights) with random gradients; prints
GPU time per step (median of CUDA-event timings), host time, and the optimizer-state size.
"""

import statistics
import time

import torch
from torch import nn

from sparsetrain.optim.packed import PackedOptimizer
from sparsetrain.sparsity.sparsifier import sparsify


def model(L=12, d=768):
    m = nn.Module()
    m.transformer_decoder = nn.Module()
    m.transformer_decoder.layers = nn.ModuleList()
    for _ in range(L):
        b = nn.Module()
        b.self_attn = nn.Module()
        for x in ("q", "k", "v", "output"):
            setattr(b.self_attn, f"proj_{x}_dense_layer", nn.Linear(d, d, bias=False))
        b.ffn = nn.Module()
        b.ffn.ffn = nn.ModuleList(nn.Module() for _ in range(2))
        b.ffn.ffn[0].linear_layer = nn.Linear(d, 4 * d, bias=False)
        b.ffn.ffn[1].linear_layer = nn.Linear(4 * d, d, bias=False)
        m.transformer_decoder.layers.append(b)
    return m.cuda()


def timed(opt, params, grads, iters):
    def setg():
        for p, g in zip(params, grads):
            p.grad = g

    for _ in range(5):
        setg()
        opt.step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        setg()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        opt.step()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        setg()
        opt.step()
    host = (time.perf_counter() - t) / iters * 1e3
    torch.cuda.synchronize()
    return statistics.median(ts), host


rows = []
for s in (0.5, 0.75, 0.9):
    for name in ("dense_fused", "generic_fused", "packed", "kernel_only", "packed_b2048"):
        if name == "dense_fused" and s == 0.75:
            continue
        if name == "packed_b2048" and s != 0.75:
            continue
        torch.manual_seed(0)
        m = model()
        params = list(m.parameters())
        grads = [torch.randn_like(p) for p in params]
        if name.startswith("packed") or name == "kernel_only":
            block = int(name.split("_b")[1]) if "_b" in name else 1024
            opt = PackedOptimizer(
                params,
                kind="adamw",
                lr=1e-4,
                weight_decay=0.1,
                block=block,
                impl="torch" if name == "packed_torch" else "triton",
            )
        else:
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
        if name == "kernel_only":
            opt.set_masks({p: torch.rand(p.shape, device="cuda") >= s for p in params})
        elif name != "dense_fused":
            sparsify(m, {"sparsity": s, "init_method": "random"}, opt)
        ms, hms = timed(opt, params, grads, 5 if name == "packed_torch" else 40)
        sb = (
            opt.state_bytes()["total"]
            if hasattr(opt, "state_bytes")
            else sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
        )
        rows.append((s, name, ms, hms, sb / 2**20))
        del opt, m, params, grads
        torch.cuda.empty_cache()
base = rows[0][2]
print(f"weights {12 * 12 * 768 * 768 / 1e6:.1f}M fp32; kernel_only = PackedOptimizer.set_masks, no sparsifier hooks")
print(f"{'sparsity':>8} {'variant':>14} {'gpu ms':>8} {'x dense':>8} {'host ms':>8} {'state MiB':>10}")
for s, nm, ms, hms, mb in rows:
    print(f"{s:>8} {nm:>14} {ms:8.3f} {ms / base:8.3f} {hms:8.3f} {mb:10.1f}")
