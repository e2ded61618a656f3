"""One training run of the tiny demo config, read back from its metrics.jsonl.

Shared by ``cpu_sparsity_sweep.py`` and ``structure_quality.py`` (both import it as a sibling
module: run them as ``python benchmarks/<script>.py``). Each run is a separate
``python run.py --mode train`` process on a fresh ``model_dir``, with ``--set`` overrides on top
of the config, so every run sees the same seed and data as the README's demo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "gpt2_tiny_sparse.yaml"


def train_tiny(model_dir: Path, overrides: list[str], config: Path = DEMO_CONFIG, steps: int | None = None) -> dict:
    """Train ``config`` with ``overrides`` (``section.key=value``) into ``model_dir``; return its results.

    ``steps`` overrides ``runconfig.max_steps`` (None: the config's). ``model_dir`` must not hold
    an earlier run: ``run.py`` would resume it and report stale numbers with a near-zero wall time.
    Returns the final eval loss, the training-FLOP ratio (dense / sparse), the fraction of the
    sparsified entries actually pruned, the steps trained and the wall time of the process.
    """
    if (model_dir / "metrics.jsonl").exists():
        raise SystemExit(f"{model_dir} already holds a run (it would be resumed): delete it or pass another --out")
    sets = [*overrides, "runconfig.progress=false"]
    if steps is not None:
        sets.append(f"runconfig.max_steps={steps}")
    cmd = [sys.executable, str(ROOT / "run.py"), "--mode", "train", "--params", str(config)]
    cmd += ["--model_dir", str(model_dir)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise SystemExit(f"run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"][-1]
    ev = [r for r in records if r.get("kind") == "eval"][-1]
    groups = [g for r in records if r.get("kind") == "sparsity" for g in r["groups"]]
    numel = sum(g["numel"] for g in groups)
    actual = 1 - sum(g["kept"] for g in groups) / numel if numel else 0.0
    return {
        "eval_loss": ev["eval_loss"],
        "flops_ratio": train["flops_ratio"],
        "actual_sparsity": actual,
        "steps": train["step"],
        "wall_s": wall,
        "overrides": sets,
    }
