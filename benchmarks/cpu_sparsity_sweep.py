"""Train the tiny demo model at several sparsities and print a Markdown table.

    python benchmarks/cpu_sparsity_sweep.py [--levels 0 0.5 0.75 0.9] [--out runs/sweep] [--steps N]

Each level is a full run of configs/gpt2_tiny_sparse.yaml (1000 steps unless ``--steps``; the
same seed and data) with ``--set sparsity.sparsity=<level>``; the table reports the final eval
loss and the training-FLOP ratio (dense / sparse, ``sparsetrain.flops``) read back from each run's
metrics.jsonl. The runs go through ``tiny_runs.train_tiny``, shared with ``structure_quality.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tiny_runs import DEMO_CONFIG, ROOT, train_tiny


def run(level: float, out: Path, config: Path, steps: int | None = None) -> dict:
    return {"level": level, **train_tiny(out / f"sparsity_{level}", [f"sparsity.sparsity={level}"], config, steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    args = p.parse_args()
    rows = [run(level, args.out, args.config, args.steps) for level in args.levels]
    print("| sparsity | final eval loss | training-FLOP ratio (dense / sparse) | wall time |")
    print("|---|---|---|---|")
    for r in rows:  # wall time is only meaningful on an otherwise idle machine
        print(f"| {r['level']:g} | {r['eval_loss']:.4f} | {r['flops_ratio']:.2f}x | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
