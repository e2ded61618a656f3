"""Do the block-sparse step's execution modes train the same model? Per-step losses of the same
run (same masks, same initialisation, same batches) under CUDA graphs, ``torch.compile``
without graphs and plain eager, side by side, with a second eager run as the noise floor.

    PYTHONPATH=src python benchmarks/mode_losses.py --preset gpt3-xl --batch_size 8 --seq_len 2048 \\
        [--modes eager,eager,graphed,compiled] [--steps 12] [--json OUT.json]

Why: issue 19's whole-step timings at the GPT-3 XL shape ended their 10 steps at losses 5.97
(graphed), 4.43 (compiled) and 3.87 (eager), while GPT-2 small's agreed to 0.003. Modes that
agree step by step at first and part later are bf16 rounding amplified by early training (the
bench runs lr 6e-4 without warm-up); modes apart from the first steps would be a bug.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from eager_step import add_run_args, mode_run  # a sibling script (run as python benchmarks/mode_losses.py)

from sparsetrain import training as tr


def losses(a, mode: str) -> list[float]:
    with mode_run(a, mode) as run:
        return [float(tr.train_step(run)) for _ in range(a.steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--modes", default="eager,eager,graphed,compiled")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    modes = a.modes.split(",")
    runs = [losses(a, m) for m in modes]
    names = [f"{m}#{modes[:i].count(m) + 1}" for i, m in enumerate(modes)]
    print("step " + " ".join(f"{n:>12}" for n in names) + "   max |diff| to the first")
    for s in range(a.steps):
        row = [r[s] for r in runs]
        print(f"{s + 1:>4} " + " ".join(f"{x:12.4f}" for x in row) + f"   {max(abs(x - row[0]) for x in row):.4f}")
    if a.json:
        out = {"preset": a.preset, "batch_size": a.batch_size, "seq_len": a.seq_len, "sparsity": a.sparsity,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "losses": dict(zip(names, runs))}
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
