"""The SPDF claim on a GPU (issue 20): sparse pre-training then dense fine-tuning against dense, at
equal steps, equal FLOPs and equal GPU time, through the product's own CLI. One table, one picture.

    python benchmarks/spdf_study.py --out runs/spdf_study [--widths 768,1024] [--seeds 0,1] \\
        [--steps 1500] [--ft_steps 120] [--arms ARM,...] [--json FILE]

Data: byte tokens of the running interpreter's standard library. The ``email``, ``json``,
``http`` and ``xml`` packages are held out as the downstream domain (``OUT/data/downstream``),
everything else is pre-training text (``OUT/data/pretrain``); each is split train/eval by the
usual file hash. Base params: ``benchmarks/spdf_study.yaml`` (context 256, batch 64, AdamW 1e-3,
cosine). Widths: 768 is GPT-2 small's shape, 1024 GPT-2 medium's width at 12 layers (where the
block kernels pay more). Per width and seed, the arms (``ARMS``) pre-train, then each is
fine-tuned densely for ``--ft_steps`` on the downstream train split from its final checkpoint
(``--checkpoint_path``: a warm start, no ``sparsity:`` block, LR 1e-4 constant):

- ``dense``: ``--steps`` steps;
- ``unstructured``: 75% unstructured (masked dense on a GPU), the same steps;
- ``unstructured_flops``: the same at equal training FLOPs (steps x the run's FLOP ratio);
- ``block``: 75% in 128x128 blocks on the block-sparse kernels, the same steps; then
  ``block_time``: as many steps as fit in dense's training time (from the two runs' median
  tokens/s);
- ``nm``: 2:4 (masked dense: GPUs do not run it faster in training), the same steps; then
  ``nm_time`` at dense's training time.

Per arm the table gives steps, training time, training FLOPs, the pre-training eval loss, the
downstream eval loss of the pre-trained model (before fine-tuning) and after it, and the
difference to dense after fine-tuning; eval losses are over the whole eval split in nats/byte
(every window once), and the fine-tuned model is also scored as the plain nanoGPT loop scores
(40 batches of random windows, five draws: ``eval_both_ways``), to size the estimator's share of
a difference between the two.
``OUT/compare.png`` draws the pre-training runs of the first width and seed against training time
(``sparsetrain compare``). Runs already finished in OUT are read back, not rerun.

Status (2026-12-03): run end to end on the CPU only, with ``--set model.preset=gpt2-tiny`` and a
few steps (every arm but the block ones, which need a GPU to mean anything); the defaults are a
first guess at what fits 10 minutes on one H200, not yet timed. Not in it yet: the plain nanoGPT
loop trained beside our runs (only its estimator is here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sparsetrain import compare  # noqa: E402
from sparsetrain.data.sources import stdlib_files  # noqa: E402

CONFIG = ROOT / "benchmarks" / "spdf_study.yaml"
DOWNSTREAM = ("email", "json", "http", "xml")
WIDTHS = {  # hidden size: model overrides (12 layers each; heads of 64)
    768: [],
    1024: ["model.hidden_size=1024", "model.num_heads=16", "model.filter_size=4096"],
}
SPARSE = {
    "unstructured": ["sparsity.sparsity=0.75", "sparsity.init_method=random"],
    "block": ["sparsity.sparsity=0.75", "sparsity.init_method=random", "sparsity.structure=block",
              "sparsity.block_size=128"],
    "nm": ["sparsity.init_method=topk", "sparsity.structure=2:4"],
}
# arm: (sparsity kind or None, how its steps are set: "steps" | "flops" | "time")
ARMS = {
    "dense": (None, "steps"),
    "unstructured": ("unstructured", "steps"),
    "unstructured_flops": ("unstructured", "flops"),
    "block": ("block", "steps"),
    "block_time": ("block", "time"),
    "nm": ("nm", "steps"),
    "nm_time": ("nm", "time"),
}
FINETUNE = ["optimizer.learning_rate=0.0001", "runconfig.max_steps={steps}", "runconfig.log_steps=20"]


def split_stdlib(out: Path, root: Path | None = None) -> tuple[Path, Path]:
    """``out/pretrain`` and ``out/downstream``: symbolic links to the ``stdlib`` source's files
    (``data.sources.stdlib_files``), the ``DOWNSTREAM`` packages in the second only."""
    root, files = stdlib_files(root)
    pre, down = out / "pretrain", out / "downstream"
    for path in files:
        rel = path.relative_to(root)
        target = (down if len(rel.parts) > 1 and rel.parts[0] in DOWNSTREAM else pre) / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return pre, down


def arm_steps(how: str, steps: int, flops_ratio: float | None = None, rate: float | None = None,
              dense_rate: float | None = None) -> int:
    """Pre-training steps of an arm: ``steps``; at equal FLOPs ``steps x flops_ratio`` (dense /
    sparse FLOPs per step); at equal time ``steps x rate / dense_rate`` (tokens/s of the arm's
    equal-steps run and of dense's)."""
    if how == "steps":
        return steps
    if how == "flops":
        return round(steps * flops_ratio)
    return round(steps * rate / dense_rate)


@dataclass
class Result:
    width: int
    seed: int
    arm: str
    steps: int
    time_s: float
    flops: float
    tokens_per_s: float
    flops_ratio: float
    pretrain_eval: float
    downstream_before: float
    downstream_after: float
    after_random: list[float]  # the same model scored nanoGPT's way: 40 random batches, per draw


def eval_both_ways(sets: list[str], checkpoint: Path, batches: int = 40, draws: int = 5) -> list[float]:
    """The mean loss of ``checkpoint`` over ``batches`` batches of windows drawn at random from the
    eval split (nanoGPT's ``estimate_loss``), once per draw (seeds 0..draws-1): the plain loop's
    estimator beside ours (every window of the split once), to see how much of a difference
    between the two is the estimator."""
    import tempfile

    import torch
    import torch.nn.functional as F

    from sparsetrain import data
    from sparsetrain import training as tr
    from sparsetrain.config.params import load_params

    params = load_params(CONFIG, sets)
    inp = params.eval_input
    with tempfile.TemporaryDirectory() as tmp:
        run = tr.setup(params, Path(tmp), checkpoint_path=checkpoint, train=False, evaluate=True, write_metrics=False)
        run.model.eval()
        out = []
        with torch.no_grad():
            for draw in range(draws):
                total = 0.0
                for step in range(batches):
                    x, y = data.get_batch(run.eval_tokens, inp.batch_size, inp.max_sequence_length, seed=draw,
                                          step=step, shuffle=True, section="eval_input")
                    with run.autocast():
                        logits = run.model(x.to(run.device))
                    total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.to(run.device).flatten()))
                out.append(total / batches)
    return out


def _cli(args: list[str], log: Path) -> None:
    cmd = [sys.executable, str(ROOT / "run.py"), *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"spdf_study: a run failed (exit {code}), see {log}:\n{tail}")


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def _last_eval(model_dir: Path) -> float:
    """The last eval loss of a run (an eval-only run too, which ``compare.read_run`` refuses)."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float([r for r in records if r.get("kind") == "eval"][-1]["eval_loss"])


def _final_checkpoint(model_dir: Path) -> Path:
    ckpts = sorted(model_dir.glob("checkpoint_*.mdl"), key=lambda p: int(p.stem.split("_")[1]))
    if not ckpts:
        raise SystemExit(f"spdf_study: {model_dir} holds no checkpoint")
    return ckpts[-1]


def run_arm(out: Path, base: list[str], width: int, seed: int, arm: str, steps: int, ft_steps: int,
            data: tuple[Path, Path], done: dict[str, Result]) -> Result:
    kind, how = ARMS[arm]
    tag = f"w{width}_s{seed}_{arm}"
    pt, ft, ft0 = out / "runs" / tag, out / "runs" / f"{tag}_ft", out / "runs" / f"{tag}_ft0"
    log = out / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    eq = done.get(f"w{width}_s{seed}_{kind}") if how != "steps" else None
    dense = done.get(f"w{width}_s{seed}_dense")
    n = arm_steps(how, steps, eq and eq.flops_ratio, eq and eq.tokens_per_s, dense and dense.tokens_per_s)
    pre, down = data
    common = [*base, *WIDTHS[width], f"runconfig.seed={seed}"]
    sparse = [] if kind is None else SPARSE[kind]  # the base params have no sparsity: block
    if not (pt / "metrics.jsonl").exists() or compare.read_run(pt).summary()["steps"] < n:
        _cli(["--mode", "train_and_eval", "--params", str(CONFIG), "--model_dir", str(pt),
              *_sets([*common, *sparse, f"train_input.data_path={pre}", f"eval_input.data_path={pre}",
                      f"runconfig.max_steps={n}"])], log)
    down_sets = [*common, f"train_input.data_path={down}", f"eval_input.data_path={down}"]  # dense: no sparsity
    ckpt = _final_checkpoint(pt)
    if not (ft0 / "metrics.jsonl").exists():  # the pre-trained model on the downstream eval split
        _cli(["--mode", "eval", "--params", str(CONFIG), "--model_dir", str(ft0), "--checkpoint_path", str(ckpt),
              *_sets(down_sets)], log)
    if not (ft / "metrics.jsonl").exists():
        ft_sets = [*down_sets, *(s.format(steps=ft_steps) for s in FINETUNE)]
        _cli(["--mode", "train_and_eval", "--params", str(CONFIG), "--model_dir", str(ft), "--checkpoint_path",
              str(ckpt), *_sets(ft_sets)], log)
    pre_run = compare.read_run(pt)
    s, train = pre_run.summary(), pre_run.train[-1]
    random40 = eval_both_ways(down_sets, _final_checkpoint(ft))
    return Result(width, seed, arm, int(s["steps"]), float(s["time_s"]), float(s["flops_sparse"] or 0.0),
                  float(s["tokens_per_s"]), float(train.get("flops_ratio", 1.0)), _last_eval(pt), _last_eval(ft0),
                  _last_eval(ft), random40)


def format_table(results: list[Result]) -> str:
    dense = {(r.width, r.seed): r for r in results if r.arm == "dense"}
    lines = ["| width | seed | arm | steps | time s | FLOPs | pre-train eval | downstream before FT | after dense FT | "
             "after FT - dense | after FT, 40 random batches (min-max of draws) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = dense.get((r.width, r.seed))
        diff = f"{r.downstream_after - d.downstream_after:+.4f}" if d else "-"
        rnd = f"{min(r.after_random):.4f}-{max(r.after_random):.4f}" if r.after_random else "-"
        lines.append(f"| {r.width} | {r.seed} | {r.arm} | {r.steps} | {r.time_s:.1f} | {r.flops:.3g} | "
                     f"{r.pretrain_eval:.4f} | {r.downstream_before:.4f} | {r.downstream_after:.4f} | {diff} | {rnd} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/spdf_study"))
    ap.add_argument("--widths", default="768,1024")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--ft_steps", type=int, default=120)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="an override for every run (e.g. model.preset=gpt2-tiny for a CPU smoke run)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    arms = a.arms.split(",")
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {', '.join(unknown)} (valid: {', '.join(ARMS)})")
    data = split_stdlib(a.out / "data")
    results: list[Result] = []
    for width in (int(w) for w in a.widths.split(",")):
        if width not in WIDTHS:
            ap.error(f"--widths: {width} is not one of {', '.join(map(str, WIDTHS))}")
        for seed in (int(s) for s in a.seeds.split(",")):
            done: dict[str, Result] = {}
            order = sorted(arms, key=lambda x: ARMS[x][1] != "steps")  # equal-steps runs first: the others scale them
            for arm in order:
                if ARMS[arm][1] != "steps" and f"w{width}_s{seed}_{ARMS[arm][0]}" not in done:
                    raise SystemExit(f"spdf_study: arm {arm} needs the arm {ARMS[arm][0]} in --arms")
                if ARMS[arm][1] == "time" and f"w{width}_s{seed}_dense" not in done:
                    raise SystemExit(f"spdf_study: arm {arm} needs the arm dense in --arms")
                r = run_arm(a.out, a.sets, width, seed, arm, a.steps, a.ft_steps, data, done)
                done[f"w{width}_s{seed}_{arm}"] = r
                results.append(r)
                print(f"w{width} seed {seed} {arm:<20} steps {r.steps:>6}  pre-train {r.pretrain_eval:.4f}  "
                      f"downstream {r.downstream_before:.4f} -> {r.downstream_after:.4f}", flush=True)
    table = format_table(results)
    print(table)
    first = sorted({(r.width, r.seed) for r in results})[0]
    pre_runs = [a.out / "runs" / f"w{first[0]}_s{first[1]}_{r.arm}" for r in results if (r.width, r.seed) == first]
    compare.compare_runs([str(p) for p in pre_runs], x="time", out=a.out / "compare.png")
    if a.json:
        a.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
