"""Train the tiny demo model at several sparsities and print a Markdown table.

    python benchmarks/cpu_sparsity_sweep.py [--levels 0 0.5 0.75 0.9] [--out runs/sweep]

Each level is a full run of configs/gpt2_tiny_sparse.yaml (1000 steps, the same seed and data)
with ``--set sparsity.sparsity=<level>``; the table reports the final eval loss and the
training-FLOP ratio (dense / sparse, SPEC §5) read back from each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(level: float, out: Path, config: Path) -> dict:
    model_dir = out / f"sparsity_{level}"
    cmd = [sys.executable, str(ROOT / "run.py"), "--mode", "train", "--params", str(config),
           "--model_dir", str(model_dir), "--set", f"sparsity.sparsity={level}", "--set", "runconfig.progress=false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"][-1]
    ev = [r for r in records if r.get("kind") == "eval"][-1]
    return {"level": level, "eval_loss": ev["eval_loss"], "flops_ratio": train["flops_ratio"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "gpt2_tiny_sparse.yaml")
    args = p.parse_args()
    rows = [run(level, args.out, args.config) for level in args.levels]
    print("| sparsity | final eval loss | training-FLOP ratio (dense / sparse) | wall time |")
    print("|---|---|---|---|")
    for r in rows:  # wall time is only meaningful on an otherwise idle machine
        print(f"| {r['level']:g} | {r['eval_loss']:.4f} | {r['flops_ratio']:.2f}x | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
