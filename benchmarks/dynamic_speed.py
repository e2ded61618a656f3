"""Dynamic sparsity's cost in tokens/s: static vs RigL (and SET) at one level and structure, in one
process, one after the other, through the normal training path (``setup`` + ``train_step``).

    python benchmarks/dynamic_speed.py --preset gpt3-xl --batch_size 8 --seq_len 2048 \
        --structure block --sparsity 0.75 --update_freq 100 --steps 300 --warmup 10 \
        --set runconfig.compile_mode=reduce-overhead

The timed window is ``--steps`` steps after ``--warmup`` steps; with ``--update_freq 100`` and 300
steps it holds three update steps, so the dynamic run's tokens/s includes, in proportion, RigL's
dense-gradient step (eager, with the dense weight-gradient probe for live-block layers), the new
masks (scores, sorts) and the in-place repack of stored blocks and optimizer state. One JSON line
per run goes to ``benchmarks/results/dynamic_speed.jsonl`` (``--label``), and a summary with the
ratios to static to stdout. Ratios within one invocation are the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsetrain import training as tr
from sparsetrain.bench.timing import peak_memory, reset_memory, sync
from sparsetrain.bench.train import _params

RESULTS = Path(__file__).resolve().parent / "results" / "dynamic_speed.jsonl"


def run_one(args, algorithm: str) -> dict:
    extra = [f"sparsity.init_method={'random' if algorithm != 'static' else 'topk'}"]
    if algorithm != "static":
        extra += [f"sparsity.algorithm={algorithm}", f"sparsity.update={{freq: {args.update_freq}}}",
                  f"sparsity.drop_fraction={args.drop_fraction}"]
    params = _params(args.preset, args.batch_size, args.seq_len, args.sparsity, "auto", "auto",
                     tuple(args.overrides) + tuple(extra), args.structure, args.block_size)
    with tempfile.TemporaryDirectory() as tmp:
        reset_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        run = tr.setup(params, Path(tmp), train=True, evaluate=False, write_metrics=False)
        update_ms = _time_updates(run)
        for _ in range(args.warmup):
            tr.train_step(run)
        sync(run.device)
        update_ms.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = tr.train_step(run)
        sync(run.device)
        ms = (time.perf_counter() - t0) * 1000.0 / args.steps
        tokens = args.batch_size * args.seq_len
        return {
            "label": args.label, "algorithm": algorithm, "structure": args.structure, "sparsity": args.sparsity,
            "preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "update_freq": args.update_freq, "steps": args.steps, "warmup": args.warmup,
            "ms_per_step": ms, "tokens_per_s": tokens * 1000.0 / ms, "loss": float(loss),
            "updates_in_window": sum(1 for s in range(args.warmup + 1, args.warmup + args.steps + 1)
                                     if run.dynamic and run.dynamic.is_update(s)),
            "dense_grad_steps": run.dynamic.dense_grad_steps if run.dynamic else 0,
            "mask_update_ms": update_ms,  # each update's new masks and repack (not the dense-gradient step)
            "block_kernel_layers": len(run.block_kernel_layers), "peak_memory_bytes": peak_memory(run.device),  # the whole run, compilation and graphs included
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        }


def _time_updates(run) -> list[float]:
    """Wrap ``run.dynamic.update`` to record each call's wall time (synchronised)."""
    times: list[float] = []
    if not run.dynamic:
        return times
    inner = run.dynamic.update

    def timed(*a, **k):
        sync(run.device)
        t0 = time.perf_counter()
        out = inner(*a, **k)
        sync(run.device)
        times.append((time.perf_counter() - t0) * 1000.0)
        return out

    run.dynamic.update = timed
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt3-xl")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--structure", default="block", choices=["block", "unstructured"])
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--update_freq", type=int, default=100)
    ap.add_argument("--drop_fraction", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--algorithms", default="static,rigl")
    ap.add_argument("--label", default="dynamic_speed")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    rows = []
    for algorithm in args.algorithms.split(","):
        rows.append(run_one(args, algorithm))
        torch._dynamo.reset()  # drop the compiled graphs (and CUDA graph pools) of the run before
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"{r['algorithm']:<8} {r['structure']:<12} {r['ms_per_step']:8.1f} ms/step {r['tokens_per_s']:10,.0f} tokens/s "
              f"{r['tokens_per_s'] / base:6.3f}x of {rows[0]['algorithm']}  updates in window {r['updates_in_window']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
