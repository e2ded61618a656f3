"""Quality of dynamic sparsity (static, SET, RigL, GMP) against dense on a small GPT; print a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/dynamic_quality.py [--steps 1200] [--seeds 1 2 3] [--levels 0.75 0.9]
                                                          [--jobs 2] [--out runs/dynamic_quality]
                                                          [--results benchmarks/results/dynamic_quality.jsonl]

The model is configs/gpt2_tiny.yaml (byte tokens on the embedded ``stdlib`` corpus, so it runs
on a fresh clone) cut down to 2 layers of width 64 (2 heads, filter 256), sequence 64, batch 8,
with one evaluation at the end over ``--eval_steps`` batches of 16 (the first batches of the
eval split, the same for every run). Every run of a seed shares that seed for the weights, the
batch order and the random masks (``sparsity.seed``). At each level in ``--levels``, on the
default heuristic (every transformer-block linear weight):

- ``static``: a fixed random mask (``init_method: random``);
- ``set``: random initial mask, an update every ``--freq`` steps before step 75% of the run,
  drop fraction ``{type: cosine, init: 0.3, half_period: stop}``;
- ``rigl``: the same schedule, regrowing by the dense gradient;
- ``gmp``: from dense, ``sparsity: {type: linear, init: 0, slope: target / R}`` with R the
  multiple of ``--freq`` nearest 60% of the run, an update every ``--freq`` steps up to R
  (``stop: R + 1``), so the last update lands exactly on the target and the schedule never
  runs past it;

and a dense run (no ``sparsity:`` block) per seed.

Each run is a ``sparsetrain train`` process on a fresh model_dir under ``--out`` (an existing
one is deleted first), at most ``--jobs`` at a time, each with ``OMP_NUM_THREADS=1``. The params
files are written to ``--out/params/``. After the runs the script checks every run: exit status
0, training reached ``--steps``, a final eval at that step, finite losses, the number of
``sparsity_update`` records against the update rule, every update's sparsity equal to the exact
target (``round(s * n)`` pruned per tensor, from ``sparsetrain plan --json``), and for GMP that
the last update hits it and none overshoots. Problems are printed after the table (and stored
per run under ``problems``); the exit status is 1 when there are any.

``--results`` gets one JSON line per run: algorithm, sparsity, seed, steps, final eval loss,
final train loss (the last logged step) and the mean train loss over the last 10% of steps,
flops_total (and dense), the number of mask updates, the mean churn (over updates; 0 for GMP,
which never regrows), the wall seconds and the exact command. stdout gets the table: mean and
sample standard deviation over seeds, and the paired difference to static at the same level
(each seed's run minus static's of the same seed, averaged).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "gpt2_tiny.yaml"
# the CLI beside this interpreter (a venv's), else the one on PATH
SPARSETRAIN = (
    str(Path(sys.executable).with_name("sparsetrain"))
    if Path(sys.executable).with_name("sparsetrain").exists()
    else "sparsetrain"
)
ALGORITHMS = ("static", "set", "rigl", "gmp")


# -- params -------------------------------------------------------------------------------------


def base_params(args: argparse.Namespace, seed: int) -> dict:
    """configs/gpt2_tiny.yaml, cut down to the study's model, batch, steps and eval."""
    params = yaml.safe_load(BASE_CONFIG.read_text())
    params["train_input"].update(batch_size=args.batch_size, max_sequence_length=args.seq_len)
    params["eval_input"].update(batch_size=args.eval_batch_size, max_sequence_length=args.seq_len)
    params["model"].update(num_hidden_layers=args.layers, hidden_size=args.width, num_heads=args.heads)
    params["runconfig"].update(
        max_steps=args.steps,
        eval_steps=args.eval_steps,
        seed=seed,
        checkpoint_steps=0,
        keep_checkpoints=1,
        log_steps=args.log_steps,
        progress=False,
    )
    return params


def gmp_reach_step(args: argparse.Namespace) -> int:
    """The update step at which GMP reaches its target: the multiple of freq nearest 60% of the run."""
    return max(args.freq, round(0.6 * args.steps / args.freq) * args.freq)


def dynamic_stop(args: argparse.Namespace) -> int:
    return round(0.75 * args.steps)


def sparsity_block(algorithm: str, level: float, seed: int, args: argparse.Namespace) -> dict | None:
    if algorithm == "dense":
        return None
    if algorithm == "gmp":
        reach = gmp_reach_step(args)
        return {
            "algorithm": "gmp",
            "sparsity": {"type": "linear", "init": 0.0, "slope": level / reach},
            "update": {"freq": args.freq, "stop": reach + 1},
        }
    block = {"algorithm": algorithm, "sparsity": level, "init_method": "random", "seed": seed}
    if algorithm in ("set", "rigl"):
        stop = dynamic_stop(args)
        block["update"] = {"freq": args.freq, "stop": stop}
        block["drop_fraction"] = {"type": "cosine", "init": 0.3, "half_period": stop}
    return block


def expected_updates(block: dict | None, steps: int) -> int:
    """Update steps in 1..steps of ``{freq, start=0, stop}`` (masks never change at step 0)."""
    if block is None or "update" not in block:
        return 0
    u = block["update"]
    stop = min(u.get("stop", steps + 1), steps + 1)
    return len(range(u["freq"], stop, u["freq"]))


def exact_target(params_file: Path) -> float:
    """The fraction of sparsified entries pruned at the target: ``round(s * n)`` per tensor, from plan."""
    out = subprocess.run(
        [SPARSETRAIN, "plan", "--params", str(params_file), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=run_env(),
    )
    rows = json.loads(out.stdout)["parameters"]
    return sum(r["pruned"] for r in rows) / sum(r["numel"] for r in rows)


SNAPSHOT: list[str] = []  # the frozen copy of src/ the runs import (empty: the live src/)


def freeze_src(out: Path) -> str:
    """Copy src/ to ``out/src_snapshot`` so that every run imports the same code, even while
    src/ is being edited; the runs put it first on PYTHONPATH (ahead of the editable install)."""
    dest = out / "src_snapshot"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ROOT / "src", dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    SNAPSHOT.append(str(dest.resolve()))
    return SNAPSHOT[0]


def run_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if SNAPSHOT:
        env["PYTHONPATH"] = os.pathsep.join([SNAPSHOT[0], *filter(None, [env.get("PYTHONPATH")])])
    return env


def tree_hash(src: Path) -> str:
    """SHA-256 over every .py file under ``src`` (tracked or not)."""
    h = hashlib.sha256()
    for f in sorted(src.rglob("*.py")):
        h.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


# -- runs ---------------------------------------------------------------------------------------


def run_one(job: dict) -> dict:
    """Train one params file into a fresh model_dir; returns what its metrics.jsonl says."""
    model_dir = Path(job["model_dir"])
    if model_dir.exists():
        shutil.rmtree(model_dir)
    cmd = [SPARSETRAIN, "train", "--params", job["params_file"], "--model_dir", str(model_dir)]
    env = run_env()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wall = time.perf_counter() - t0
    row = {k: job[k] for k in ("algorithm", "sparsity", "seed", "steps")}
    prefix = "OMP_NUM_THREADS=1 " + (f"PYTHONPATH={shlex.quote(SNAPSHOT[0])} " if SNAPSHOT else "")
    row.update(wall_s=round(wall, 1), command=prefix + shlex.join(cmd), returncode=proc.returncode)
    (model_dir / "stdout.log").parent.mkdir(parents=True, exist_ok=True)
    (model_dir / "stdout.log").write_text(proc.stdout)
    row.update(read_metrics(model_dir / "metrics.jsonl", job["steps"]))
    row["problems"] = check(row, job, proc.stdout)
    return row


def read_metrics(path: Path, steps: int) -> dict:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    updates = [r for r in records if r.get("kind") == "sparsity_update"]
    tail = [r["loss"] for r in train if r["step"] > 0.9 * steps]
    out = {
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_step": evals[-1]["step"] if evals else None,
        "eval_tokens": evals[-1].get("eval_tokens") if evals else None,
        "train_loss": train[-1]["loss"] if train else None,
        "train_loss_last10pct": statistics.fmean(tail) if tail else None,
        "train_step": train[-1]["step"] if train else None,
        "flops_total": train[-1].get("flops_total") if train else None,
        "flops_total_dense": train[-1].get("flops_total_dense") if train else None,
        "updates": len(updates),
        "mean_churn": statistics.fmean(u["churn"] for u in updates) if updates else None,
        "update_steps": [u["step"] for u in updates],
        "last_update": {k: updates[-1].get(k) for k in ("step", "level", "sparsity", "drop_fraction")}
        if updates
        else None,
        "update_sparsities": sorted({round(u["sparsity"], 12) for u in updates}),
        "max_level": max(u["level"] for u in updates) if updates else None,
        "dropped_regrown_mismatch": sum(1 for u in updates if u["algorithm"] != "gmp" and u["dropped"] != u["regrown"]),
    }
    return out


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check(row: dict, job: dict, stdout: str) -> list[str]:
    problems = []
    if row["returncode"] != 0:
        tail = "\n".join(stdout.splitlines()[-15:])
        return [f"exit status {row['returncode']}: {row['command']}\n{tail}"]
    if "eval_loss" not in row:
        return ["no metrics.jsonl"]
    if row["train_step"] != job["steps"]:
        problems.append(f"last train record at step {row['train_step']}, not {job['steps']}")
    if row["eval_step"] != job["steps"]:
        problems.append(f"final eval at step {row['eval_step']}, not {job['steps']}")
    for key in ("eval_loss", "train_loss", "train_loss_last10pct"):
        if not finite(row[key]):
            problems.append(f"{key} is {row[key]}")
    if row["updates"] != job["expected_updates"]:
        problems.append(f"{row['updates']} sparsity_update records, the rule gives {job['expected_updates']}")
    target = job.get("exact_target")
    if row["algorithm"] in ("set", "rigl"):
        if any(abs(s - target) > 1e-9 for s in row["update_sparsities"]):
            problems.append(f"update sparsities {row['update_sparsities']} differ from the target {target}")
        if row["dropped_regrown_mismatch"]:
            problems.append(f"{row['dropped_regrown_mismatch']} updates regrew a different count than they dropped")
    if row["algorithm"] == "gmp":
        last = row["last_update"] or {}
        if last.get("step") != job["gmp_reach"]:
            problems.append(f"last GMP update at step {last.get('step')}, expected {job['gmp_reach']}")
        if last.get("sparsity") is None or abs(last["sparsity"] - target) > 1e-9:
            problems.append(f"GMP's last update reached sparsity {last.get('sparsity')}, target {target}")
        if row["max_level"] is not None and row["max_level"] > job["sparsity"] + 1e-9:
            problems.append(f"GMP level overshot: max {row['max_level']} > {job['sparsity']}")
    return problems


# -- report -------------------------------------------------------------------------------------


def mean_sd(values: list[float], sign: str = "") -> str:
    """``mean ± sample std`` (the value alone for one run); ``sign="+"`` shows the sign (differences)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{sign}.4f}"
    return f"{statistics.fmean(values):{sign}.4f} ± {statistics.stdev(values):.4f}"


def table(rows: list[dict]) -> str:
    ok = [r for r in rows if finite(r.get("eval_loss"))]
    static = {(r["sparsity"], r["seed"]): r["eval_loss"] for r in ok if r["algorithm"] == "static"}
    dense = {r["seed"]: r["eval_loss"] for r in ok if r["algorithm"] == "dense"}
    keys = sorted(
        {(r["sparsity"], r["algorithm"]) for r in rows}, key=lambda k: (k[0], (("dense",) + ALGORITHMS).index(k[1]))
    )
    lines = [
        "| sparsity | algorithm | seeds | final eval loss | Δ vs static (paired) | Δ vs dense (paired) "
        "| final train loss | train loss, last 10% | training FLOPs (dense / this) | updates | mean churn | wall s (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level, algo in keys:
        rs = [r for r in ok if r["sparsity"] == level and r["algorithm"] == algo]
        n_all = sum(1 for r in rows if r["sparsity"] == level and r["algorithm"] == algo)
        d_static = [r["eval_loss"] - static[(level, r["seed"])] for r in rs if (level, r["seed"]) in static]
        d_dense = [r["eval_loss"] - dense[r["seed"]] for r in rs if r["seed"] in dense]
        ratio = [r["flops_total_dense"] / r["flops_total"] for r in rs if r.get("flops_total")]
        churn = [r["mean_churn"] for r in rs if r.get("mean_churn") is not None]
        seeds = f"{len(rs)}" + ("" if len(rs) == n_all else f" of {n_all}")
        lines.append(
            f"| {level:g} | {algo} | {seeds} | {mean_sd([r['eval_loss'] for r in rs])} "
            f"| {'' if algo in ('static', 'dense') else mean_sd(d_static, '+')} | {'' if algo == 'dense' else mean_sd(d_dense, '+')} "
            f"| {mean_sd([r['train_loss'] for r in rs])} | {mean_sd([r['train_loss_last10pct'] for r in rs])} "
            f"| {statistics.fmean(ratio):.2f}x | {'/'.join(sorted({str(r['updates']) for r in rs}))} "
            f"| {f'{statistics.fmean(churn):.4f}' if churn else '-'} | {statistics.fmean(r['wall_s'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def provenance() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "study_command": "OMP_NUM_THREADS=1 " + shlex.join(["python", "benchmarks/dynamic_quality.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "src_sha256": tree_hash(ROOT / "src"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--levels", type=float, nargs="+", default=[0.75, 0.9])
    p.add_argument("--algorithms", nargs="+", choices=("dense", *ALGORITHMS), default=["dense", *ALGORITHMS])
    p.add_argument("--freq", type=int, default=50, help="steps between mask updates (set, rigl, gmp)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--eval_steps", type=int, default=20, help="eval batches at the end (the same for every run)")
    p.add_argument("--log_steps", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (each one thread)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "dynamic_quality", help="params files and model_dirs")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "dynamic_quality.jsonl")
    p.add_argument(
        "--live_src",
        action="store_true",
        help="run the live src/ (default: a copy of src/ taken at the start, see freeze_src)",
    )
    args = p.parse_args()
    if args.steps < 2 * args.freq:
        p.error("--steps must be at least 2 * --freq")

    meta = provenance()
    (args.out / "params").mkdir(parents=True, exist_ok=True)
    if not args.live_src:
        meta["src_snapshot"] = freeze_src(args.out)
        meta["src_sha256"] = tree_hash(Path(SNAPSHOT[0]))
        check_import = subprocess.run(
            [sys.executable, "-c", "import sparsetrain; print(sparsetrain.__file__)"],
            capture_output=True,
            text=True,
            env=run_env(),
        )
        if not check_import.stdout.strip().startswith(SNAPSHOT[0]):
            raise SystemExit(f"the runs would not import the snapshot: {check_import.stdout}{check_import.stderr}")
    jobs, targets = [], {}
    for seed in args.seeds:
        for algo in args.algorithms:
            for level in [0.0] if algo == "dense" else args.levels:
                name = f"{algo}_s{level:g}_seed{seed}" if algo != "dense" else f"dense_seed{seed}"
                params = base_params(args, seed)
                block = sparsity_block(algo, level, seed, args)
                if block is not None:
                    params["sparsity"] = block
                params_file = args.out / "params" / f"{name}.yaml"
                params_file.write_text(yaml.safe_dump(params, sort_keys=False))
                job = {
                    "algorithm": algo,
                    "sparsity": level,
                    "seed": seed,
                    "steps": args.steps,
                    "name": name,
                    "params_file": str(params_file),
                    "model_dir": str(args.out / name),
                    "expected_updates": expected_updates(block, args.steps),
                    "gmp_reach": gmp_reach_step(args),
                }
                if block is not None:
                    if level not in targets:  # the exact fraction pruned at this level: a static file's plan
                        static = copy.deepcopy(params)
                        static["sparsity"] = sparsity_block("static", level, seed, args)
                        f = args.out / "params" / f"_plan_s{level:g}.yaml"
                        f.write_text(yaml.safe_dump(static, sort_keys=False))
                        targets[level] = exact_target(f)
                    job["exact_target"] = targets[level]
                jobs.append(job)

    print(
        f"# {meta['study_command']}  ({meta['date']}, {len(jobs)} runs, {args.jobs} at a time)",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    rows: list[dict] = []

    def run_and_report(job: dict) -> dict:
        row = run_one(job)
        el = row.get("eval_loss")
        print(
            f"[{time.perf_counter() - t0:6.0f} s] {job['name']}: eval loss {el if el is None else f'{el:.4f}'}, "
            f"{row['updates'] if 'updates' in row else '-'} updates, {row['wall_s']:.0f} s"
            + (f"  PROBLEMS: {row['problems']}" if row["problems"] else ""),
            file=sys.stderr,
            flush=True,
        )
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_and_report, jobs))
    total = time.perf_counter() - t0

    end_hash = tree_hash(Path(SNAPSHOT[0]) if SNAPSHOT else ROOT / "src")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("w") as f:
        for row in rows:
            f.write(json.dumps({**row, **meta, "src_sha256_at_end": end_hash, "total_wall_s": round(total, 1)}) + "\n")

    print(table(rows))
    print(
        f"\n{args.steps} steps per run; seeds {' '.join(map(str, args.seeds))}; {len(rows)} runs, {args.jobs} at a time; "
        f"total wall time {total / 60:.1f} min. Eval: {args.eval_steps} batches x {args.eval_batch_size} x {args.seq_len} tokens."
    )
    print(
        "Exact targets (fraction pruned, round(s*n) per tensor): "
        + ", ".join(f"{k:g} -> {v:.6f}" for k, v in sorted(targets.items()))
    )
    if end_hash != meta["src_sha256"]:
        print("warning: the code the runs import changed while they trained; rows may not share one code version")
    if SNAPSHOT and tree_hash(ROOT / "src") != meta["src_sha256"]:
        print(f"note: src/ has changed since the snapshot the runs used ({SNAPSHOT[0]})")
    bad = [r for r in rows if r["problems"]]
    for r in bad:
        print(f"\nPROBLEM {r['algorithm']} {r['sparsity']:g} seed {r['seed']}:\n  " + "\n  ".join(r["problems"]))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
