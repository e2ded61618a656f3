"""Train the tiny demo model with different sparsity structures at equal sparsity; print a Markdown table.

    python benchmarks/structure_quality.py [--steps N] [--block_sizes 16 32] [--out runs/structure_quality]
                                           [--json runs/structure_quality.json]
    # on a GPU, GPT-2 small with 128x128 blocks (the kernels' default), one sparsity level per GPU:
    python benchmarks/structure_quality.py --config configs/gpt2_small.yaml --block_sizes 128 --levels 0.5 \
        --steps 250 --set train_input.tokenizer=byte --set model.vocab_size=256 --set runconfig.eval_steps=16

Every row is a full run of configs/gpt2_tiny_sparse.yaml (1000 steps unless ``--steps``; the same
seed and data as the README's demo and ``cpu_sparsity_sweep.py``, through the same helper,
``tiny_runs.train_tiny``), with ``--set`` overrides for the sparsity and the structure:

- sparsity 0: dense, the baseline;
- sparsity 0.5: unstructured, ``block`` at each ``--block_sizes``, and ``"2:4"``;
- sparsity 0.75: unstructured, ``block`` at each ``--block_sizes``, and ``"1:4"``.

Block sizes: the tiny model (hidden size 128) sparsifies 384x128 (QKV), 128x128 (attention
output), 512x128 and 128x512 (MLP) weights. 16 and 32 divide every one of those dimensions, so
there are no partial edge blocks and exactly ``s`` of the entries are pruned in every tensor, as
in the unstructured and N:M rows (the table's "pruned" column checks it). The default of 128
does not fit this model: the attention output weight would be a single block (all kept at 0.5,
all pruned at 0.75) and QKV three blocks (two pruned at 0.5: 67%).

The table reports the final eval loss, its difference to the dense run and to the unstructured
run at the same sparsity, the training-FLOP ratio (dense / sparse, ``sparsetrain.flops``), the fraction of the
sparsified entries actually pruned and each run's wall time. Runs are sequential; ``--json``
also writes every row with the command, the commit and the versions, to reproduce the table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tiny_runs import DEMO_CONFIG, ROOT, train_tiny

NM = {0.5: "2:4", 0.75: "1:4"}  # the N:M pattern of each sparsity: 1 - N/M = s


def configurations(
    block_sizes: list[int], levels: list[float] | None = None, dense: bool = True
) -> list[tuple[str, str, float, list[str]]]:
    """(label, model_dir name, sparsity, extra overrides) of every run, in table order."""
    confs = [("dense", "s0_dense", 0.0, [])] if dense else []
    for level, nm in NM.items():
        if levels is not None and level not in levels:
            continue
        confs.append(("unstructured", f"s{level}_unstructured", level, []))
        for b in block_sizes:
            block = ["sparsity.structure=block", f"sparsity.block_size={b}"]
            confs.append((f"block {b}x{b}", f"s{level}_block{b}", level, block))
        confs.append((f'"{nm}"', f"s{level}_{nm.replace(':', 'of')}", level, [f"sparsity.structure='{nm}'"]))
    return confs


def table(rows: list[dict]) -> str:
    dense = next((r["eval_loss"] for r in rows if r["sparsity"] == 0), None)  # None without a dense row
    unstructured = {r["sparsity"]: r["eval_loss"] for r in rows if r["structure"] == "unstructured"}
    lines = [
        "| sparsity | structure | final eval loss (nats/byte) | vs dense | vs unstructured | training-FLOP ratio (dense / sparse) | pruned (actual) | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = "" if dense is None or r["sparsity"] == 0 else f"{r['eval_loss'] - dense:+.4f}"
        u = unstructured.get(r["sparsity"])
        du = "" if u is None or r["structure"] in ("unstructured", "dense") else f"{r['eval_loss'] - u:+.4f}"
        lines.append(
            f"| {r['sparsity']:g} | {r['structure']} | {r['eval_loss']:.4f} | {d} | {du} | {r['flops_ratio']:.2f}x "
            f"| {r['actual_sparsity']:.1%} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def src_hash() -> str:
    """SHA-256 over src/ (every .py file, tracked or not): the code the runs trained with."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "src").rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def provenance() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "command": shlex.join(["python", "benchmarks/structure_quality.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "src_sha256": src_hash(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's, 1000)")
    p.add_argument("--block_sizes", type=int, nargs="+", default=[16, 32], help="square block sizes (default: 16 32)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "structure_quality", help="parent of the model_dirs")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG)
    p.add_argument("--json", type=Path, default=None, help="also write the rows and their provenance here")
    p.add_argument("--levels", type=float, nargs="+", choices=sorted(NM), default=None,
                   help="sparsity levels to run (default: all)")
    p.add_argument("--no_dense", action="store_true", help="leave out the dense run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an override for every run (repeatable), e.g. runconfig.eval_steps=16")
    args = p.parse_args()
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    confs = configurations(args.block_sizes, args.levels, dense=not args.no_dense)
    meta = provenance()
    print(f"# {meta['command']}  ({meta['date']}, {len(confs)} runs, one after another)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rows = []
    for i, (label, name, level, extra) in enumerate(confs, 1):
        res = train_tiny(args.out / name, [*args.sets, f"sparsity.sparsity={level}", *extra], args.config, args.steps)
        rows.append({"sparsity": level, "structure": label, "model_dir": str(args.out / name), **res})
        print(
            f"[{i}/{len(confs)}] sparsity {level:g} {label}: eval loss {res['eval_loss']:.4f}, "
            f"FLOP ratio {res['flops_ratio']:.2f}x, pruned {res['actual_sparsity']:.1%}, {res['wall_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    total = time.perf_counter() - t0
    if src_hash() != meta["src_sha256"]:
        meta["src_sha256_at_end"] = src_hash()
        print("warning: src/ changed while the runs trained; rows may not share one code version", file=sys.stderr)
    text = table(rows)
    print(text)
    print(f"\n{rows[0]['steps']} steps per run, {len(rows)} runs, total wall time {total / 60:.1f} min", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {**meta, "config": str(args.config), "steps": rows[0]["steps"], "total_wall_s": total, "rows": rows}
        args.json.write_text(json.dumps({**doc, "table": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()
