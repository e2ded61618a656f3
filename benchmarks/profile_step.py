"""Where a training step's GPU time goes: torch.profiler over a few steps of the bench's run,
kernels grouped by what they do (block-sparse kernels, cuBLAS GEMMs, attention, optimizer,
the rest), each group's share of the step.

    python benchmarks/profile_step.py --preset gpt2-small --structure block --sparsity 0.75 \
        --set runconfig.compile_mode=reduce-overhead --json FILE

The run is built exactly as ``sparsetrain bench train`` builds it (``sparsetrain.bench.train._params``
+ ``sparsetrain.training.setup`` + ``training.train_step``), warmed up (compilation, autotuning), then profiled for
``--steps`` steps. ``--sparsity 0`` profiles the dense step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sparsetrain import training as tr
from sparsetrain.bench import train as bench

# First match wins; patterns are searched in the kernel name.
GROUPS = (
    ("block-sparse forward", r"_forward_kernel"),
    ("block-sparse input grad", r"_dgrad_kernel"),
    ("block-sparse weight grad", r"_wgrad_kernel"),
    ("block pack / unpack", r"_pack_kernel|_unpack"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("GEMM (cuBLAS)", r"gemm|sm90_xmma|cutlass|nvjet|Kernel2"),
    ("Triton fused (inductor)", r"^triton_"),
    ("optimizer", r"[Aa]dam|multi_tensor_apply|foreach"),
    ("cross-entropy / softmax", r"softmax|cross_entropy|nll|log_softmax"),
)


def group_of(name: str) -> str:
    for label, pattern in GROUPS:
        if re.search(pattern, name):
            return label
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--structure", default="block")
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    sparsity = a.sparsity or None
    params = bench._params(a.preset, a.batch_size, a.seq_len, sparsity, "auto", "cuda", tuple(a.set),
                           a.structure, a.block_size)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        run = tr.setup(params, Path(tmp), train=True, evaluate=False, write_metrics=False)
        for _ in range(a.warmup):
            tr.train_step(run)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                tr.train_step(run)
            torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if us > 0:
            kernels[ev.key] += us
    total = sum(kernels.values()) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for name, us in kernels.items():
        groups[group_of(name)] += us
    per_step = total / a.steps / 1000.0
    print(f"{a.preset} {a.structure} sparsity {a.sparsity:g}: {per_step:.2f} ms of GPU kernels per step "
          f"({len(run.block_kernel_layers)} layers on the block kernels)")
    for label, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {label:28s} {us / a.steps / 1000.0:8.3f} ms  {100 * us / total:5.1f}%")
    print(f"top {a.top} kernels:")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"  {us / a.steps / 1000.0:8.3f} ms  {100 * us / total:5.1f}%  {name[:110]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "ms_per_step_kernels": per_step, "groups_us": groups, "kernels_us": kernels}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
