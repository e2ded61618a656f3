"""The SPDF claim on a GPU (issue 20): sparse pre-training then dense fine-tuning against dense, at
equal steps, equal FLOPs and equal GPU time, through the product's own CLI. One table, one picture.

    python benchmarks/spdf_study.py --out runs/spdf_study [--widths 768,1024] [--seeds 0,1] \\
        [--steps 300] [--ft_steps 100] [--arms ARM,...] [--close 0.1] [--both_estimators] [--json FILE]

On an H200 the default grid (both widths, two seeds, 22 arms) takes about 12 minutes (735 s of
arm time, 2026-12-04, BENCHMARKS.md; over a 10-minute device call, so resume it: the same
command again), one width at one seed 3-5 minutes.

Data: byte tokens of the running interpreter's standard library. The ``email``, ``json``,
``http`` and ``xml`` packages are held out as the downstream domain (``OUT/data/downstream``),
everything else is pre-training text (``OUT/data/pretrain``); each is split train/eval by the
usual file hash. Base params: ``benchmarks/spdf_study.yaml`` (context 256, batch 64, AdamW 1e-3,
cosine). Widths: 768 is GPT-2 small's shape, 1024 GPT-2 medium's width at 12 layers (where the
block kernels pay more). Per width and seed, the arms (``ARMS``; by default ``width_arms``: all
but the plain loop at the widest width, dense, blocks and 2:4 at the others) pre-train, then each is
fine-tuned densely for ``--ft_steps`` on the downstream train split from its final checkpoint
(``--checkpoint_path``: a warm start, no ``sparsity:`` block, LR 1e-4 constant):

- ``dense``: ``--steps`` steps;
- ``unstructured``: 75% unstructured (masked dense on a GPU), the same steps;
- ``unstructured_flops``: the same at equal training FLOPs (steps x the run's FLOP ratio);
- ``block``: 75% in 128x128 blocks on the block-sparse kernels, the same steps; then
  ``block_time``: as many steps as fit in dense's training time (from the two runs' median
  tokens/s);
- ``nm``: 2:4 (masked dense: GPUs do not run it faster in training), the same steps; then
  ``nm_time`` at dense's training time;
- ``nanogpt_loop``: dense through a plain nanoGPT loop (``plain_loop``: ``bench.reference_loop``'s
  model, the same batches, schedule, AdamW settings and clipping), then the same fine-tuning: the
  yardstick for "is a difference ours or the method's".

Per arm the table gives steps, training time, training FLOPs, the pre-training eval loss, the
downstream eval loss of the pre-trained model (before fine-tuning) and after it, and the
difference to dense after fine-tuning; eval losses are over the whole eval split in nats/byte
(every window once; the downstream split holds a quarter of its files, ``DOWNSTREAM_EVAL_FRACTION``),
and the fine-tuned dense and plain-loop models are also scored as the plain nanoGPT loop scores
(40 batches of random windows, five draws), to size the estimator's share of a difference between
the two (``--both_estimators``: every arm).

The first seed runs every arm; later seeds only those whose first-seed difference to dense after
fine-tuning is under ``--close`` (0.1, about 7x dense's same-seed spread), with what they are
scaled from (``repeat_arms``): a second seed where a difference is small, not where it is not.

Pre-training and fine-tuning go through ``run.py`` in this one process (``_cli``); the
pre-trained model's downstream loss is ``training.loop.evaluate`` without compilation
(``_downstream_before``: not timed on a GPU yet, it replaced an eval-only ``run.py`` run per
arm after the 2026-12-03 GPU runs). Seeds outermost (every width at
the first seed first), and each finished arm is appended to ``OUT/results.jsonl`` at once; a
rerun into the same OUT takes the arms that file holds for the same settings as done (that file
alone, carried to another machine with the same GPU, resumes a study), and runs finished in OUT
are read back; ``OUT/settings.json`` keeps a study of other settings out of that OUT.
``OUT/compare.png`` draws the pre-training runs of the widest width at the first seed against training time
(``sparsetrain compare``; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sparsetrain import compare  # noqa: E402
from sparsetrain.data.sources import stdlib_files  # noqa: E402
from sparsetrain.errors import UserError  # noqa: E402

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
    "nanogpt_loop": (None, "loop"),  # dense through a plain nanoGPT loop, not the product (plain_loop)
}
# The arms a study runs unless --arms names them: at its widest width every arm of the product; at
# narrower widths those whose speed depends on the width (the block kernels pay more the wider
# the matrices; 2:4 runs masked dense): unstructured runs masked dense at dense's speed at every
# width, so a second width would repeat its quality question without a speed question, at the
# cost of the study's longest run (equal FLOPs: 3.5x dense's steps). The plain loop, the
# yardstick that explained the fine-tuning gap (BENCHMARKS.md), only when --arms names it.
WIDEST_ARMS = ("dense", "unstructured", "unstructured_flops", "block", "block_time", "nm", "nm_time")
NARROWER_ARMS = ("dense", "block", "block_time", "nm", "nm_time")


def width_arms(arms: list[str] | None, width: int, widths: list[int]) -> list[str]:
    """The arms of ``width`` in a study of ``widths``: ``arms`` (``--arms``) where given, else
    ``WIDEST_ARMS`` at the widest width and ``NARROWER_ARMS`` at the others."""
    if arms is not None:
        return list(arms)
    return list(WIDEST_ARMS if width == max(widths) else NARROWER_ARMS)


# The downstream packages are 61 files (0.9 MB): the default 5% of files leaves 30 windows (7.7 KB) to
# evaluate on, too few to compare runs; a quarter of the files holds about 0.2 MB.
DOWNSTREAM_EVAL_FRACTION = 0.25
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


def downstream_sets(down: Path) -> list[str]:
    """The overrides of a run on the downstream domain (both sections split its files alike)."""
    return [f"train_input.data_path={down}", f"eval_input.data_path={down}",
            f"train_input.eval_fraction={DOWNSTREAM_EVAL_FRACTION}", f"eval_input.eval_fraction={DOWNSTREAM_EVAL_FRACTION}"]


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
    wall_s: dict[str, float] | None = None  # seconds per part of the arm, in the process that ran it


def random_batches_loss(loss_of, tokens, inp, batches: int = 40, draws: int = 5) -> list[float]:
    """nanoGPT's ``estimate_loss``: the mean of ``loss_of(x, y)`` (a batch's mean loss) over
    ``batches`` batches of windows drawn at random from ``tokens``, once per draw (seeds 0..)."""
    import torch

    from sparsetrain import data

    out = []
    with torch.no_grad():
        for draw in range(draws):
            total = 0.0
            for step in range(batches):
                x, y = data.get_batch(tokens, inp.batch_size, inp.max_sequence_length, seed=draw, step=step,
                                      shuffle=True, section="eval_input")
                total += loss_of(x, y)
            out.append(total / batches)
    return out


def whole_split_loss(loss_of, tokens, inp) -> float:
    """Our estimator (``training.loop.evaluate``): every window of the split once, the mean over
    its tokens."""
    import torch

    from sparsetrain import data

    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in data.eval_batches(tokens, inp.batch_size, inp.max_sequence_length):
            total += loss_of(x, y) * y.numel()
            count += y.numel()
    return total / count


@contextmanager
def scored_run(sets: list[str], checkpoint: Path):
    """``(run, loss_of)``: the product's run of ``sets`` from ``checkpoint`` set up to evaluate,
    without ``torch.compile`` (a pass or two over a split does not repay a compilation), and a
    batch's mean loss under it (``loss_of(x, y)``, the form the estimators above take)."""
    import tempfile

    import torch
    import torch.nn.functional as F

    from sparsetrain import training as tr
    from sparsetrain.config.params import load_params

    params = load_params(CONFIG, [*sets, "runconfig.compile=false"])
    with tempfile.TemporaryDirectory() as tmp:
        run = tr.setup(params, Path(tmp), checkpoint_path=checkpoint, train=False, evaluate=True, write_metrics=False)
        run.model.eval()

        def loss_of(x, y) -> float:
            with torch.no_grad(), run.autocast():
                logits = run.model(x.to(run.device))
            return float(F.cross_entropy(logits.flatten(0, 1).float(), y.to(run.device).flatten()))

        yield run, loss_of


def eval_both_ways(sets: list[str], checkpoint: Path, batches: int = 40, draws: int = 5) -> list[float]:
    """``checkpoint`` scored the plain loop's way (:func:`random_batches_loss`) on the eval split
    of ``sets``, beside ours (every window once), to see how much of a difference between the
    two is the estimator."""
    with scored_run(sets, checkpoint) as (run, loss_of):
        return random_batches_loss(loss_of, run.eval_tokens, run.params.eval_input, batches, draws)


def plain_loop(pre_sets: list[str], down_sets: list[str], ft_steps: int) -> dict:
    """The dense arm through a plain nanoGPT loop instead of our product: ``bench.reference_loop``'s
    model (nanoGPT's: no biases, tied head, its initialisation, weight decay on every matrix) on
    the same batches, learning-rate schedule, AdamW settings and gradient clipping as our dense
    arm, then the same dense fine-tuning, each model scored both ways on the same eval splits.
    What differs from ours is the model code and its training loop, nothing of the data."""
    import time

    import torch

    from sparsetrain import data
    from sparsetrain.bench.reference_loop import RefConfig, RefGPT
    from sparsetrain.config.params import load_params
    from sparsetrain.optim.schedule import lr_at

    pre, down = load_params(CONFIG, pre_sets), load_params(CONFIG, [*down_sets, *(s.format(steps=ft_steps) for s in FINETUNE)])
    m, dev = pre.model, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(pre.runconfig.seed)
    model = RefGPT(RefConfig(n_layer=m.num_hidden_layers, n_head=m.num_heads, n_embd=m.hidden_size,
                             block_size=m.max_position_embeddings, vocab_size=m.vocab_size)).to(dev)
    forward = torch.compile(model) if dev.type == "cuda" else model

    def streams(params):
        tok = data.load_tokenizer(params.train_input, None)
        return data.load_tokens(params.train_input, tok, None), data.load_tokens(params.eval_input, tok, None)

    def train(params, stream) -> float:
        o, inp, n = params.optimizer, params.train_input, params.runconfig.max_steps
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": o.weight_decay_rate},
                                 {"params": rest, "weight_decay": 0.0}], lr=0.0, betas=(o.beta1, o.beta2), eps=o.eps,
                                fused=dev.type == "cuda")
        model.train()
        t0 = first = time.perf_counter()
        for step in range(n):
            if step == 1:  # the first step compiles: timed at the others' mean, as ours (compare.training_time)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(o.learning_rate, step, n)
            x, y = data.get_batch(stream, inp.batch_size, inp.max_sequence_length, seed=params.runconfig.seed,
                                  step=step, shuffle=inp.shuffle)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = forward(x.to(dev), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.max_gradient_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_gradient_norm)
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        return (end - first) * n / (n - 1) if n > 1 else end - t0

    def loss_of(x, y) -> float:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            return float(model(x.to(dev), y.to(dev)))

    (pre_train, pre_eval), (down_train, down_eval) = streams(pre), streams(down)
    seconds = train(pre, pre_train)
    model.eval()
    out = {"steps": pre.runconfig.max_steps, "time_s": seconds,
           "tokens_per_s": pre.runconfig.max_steps * pre.train_input.batch_size * pre.train_input.max_sequence_length / seconds,
           "pretrain_eval": whole_split_loss(loss_of, pre_eval, pre.eval_input),
           "downstream_before": whole_split_loss(loss_of, down_eval, down.eval_input)}
    train(down, down_train)
    model.eval()
    out["downstream_after"] = whole_split_loss(loss_of, down_eval, down.eval_input)
    out["after_random"] = random_batches_loss(loss_of, down_eval, down.eval_input)
    return out


def _cli(args: list[str], log: Path) -> None:
    """One ``run.py`` run in this process (``zoo_cli.run_py``), its output into ``log``: the
    interpreter, torch and Triton start once for the whole study, and compiled kernels are
    reused; TorchDynamo is reset after each run so that it frees the run's model."""
    import gc
    import os

    import torch

    from sparsetrain.zoo_cli import run_py

    with open(log, "a") as f:
        f.write("$ python run.py " + " ".join(args) + "\n")
        f.flush()
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            code = run_py(args)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if code:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"spdf_study: a run failed (exit {code}), see {log}:\n{tail}")


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def _last_eval(model_dir: Path) -> float:
    """The last eval loss of a run (an eval-only run too, which ``compare.read_run`` refuses)."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float([r for r in records if r.get("kind") == "eval"][-1]["eval_loss"])


def _downstream_before(ft0: Path, sets: list[str], checkpoint: Path) -> float:
    """The pre-trained model's loss on the downstream eval split (``training.loop.evaluate`` in
    :func:`scored_run`), kept in ``ft0/eval.json`` so that a rerun reads it back."""
    from sparsetrain import training as tr

    kept = ft0 / "eval.json"
    if kept.exists():
        return float(json.loads(kept.read_text())["eval_loss"])
    with scored_run(sets, checkpoint) as (run, _):
        record = tr.evaluate(run)
    ft0.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({**record, "checkpoint": str(checkpoint)}))
    return float(record["eval_loss"])


def _evaluated(model_dir: Path) -> bool:
    metrics = model_dir / "metrics.jsonl"
    return metrics.exists() and '"kind": "eval"' in metrics.read_text()


def _trained(model_dir: Path, steps: int) -> bool:
    """Finished: its final checkpoint and an eval after it. A run stopped by SIGTERM or Ctrl-C
    exits 0 with an earlier checkpoint (``training.signals``), so the exit code does not say."""
    return (model_dir / f"checkpoint_{steps}.mdl").exists() and _evaluated(model_dir)


def _check_trained(model_dir: Path, steps: int, log: Path) -> None:
    if not _trained(model_dir, steps):
        raise SystemExit(f"spdf_study: {model_dir} stopped before step {steps} (interrupted?), see {log}; "
                         "run the same command again to resume it")


def run_arm(out: Path, base: list[str], width: int, seed: int, arm: str, steps: int, ft_steps: int,
            data: tuple[Path, Path], done: dict[str, Result], both_estimators: bool = True) -> Result:
    kind, how = ARMS[arm]
    wall, clock = {}, time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        wall[part], clock = round(now - clock, 1), now

    tag = f"w{width}_s{seed}_{arm}"
    pre, down = data
    common = [*base, *WIDTHS[width], f"runconfig.seed={seed}"]
    if how == "loop":
        r = plain_loop([*common, f"train_input.data_path={pre}", f"eval_input.data_path={pre}",
                        f"runconfig.max_steps={steps}"], [*common, *downstream_sets(down)], ft_steps)
        lap("all")
        return Result(width, seed, arm, r["steps"], r["time_s"], 0.0, r["tokens_per_s"], 1.0, r["pretrain_eval"],
                      r["downstream_before"], r["downstream_after"], r["after_random"], wall)
    pt, ft, ft0 = out / "runs" / tag, out / "runs" / f"{tag}_ft", out / "runs" / f"{tag}_ft0"
    log = out / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    eq = done.get(f"w{width}_s{seed}_{kind}") if how != "steps" else None
    dense = done.get(f"w{width}_s{seed}_dense")
    n = arm_steps(how, steps, eq and eq.flops_ratio, eq and eq.tokens_per_s, dense and dense.tokens_per_s)
    sparse = [] if kind is None else SPARSE[kind]  # the base params have no sparsity: block
    if not _trained(pt, n):
        _cli(["--mode", "train_and_eval", "--params", str(CONFIG), "--model_dir", str(pt),
              *_sets([*common, *sparse, f"train_input.data_path={pre}", f"eval_input.data_path={pre}",
                      f"runconfig.max_steps={n}"])], log)
        _check_trained(pt, n, log)
    lap("pretrain")
    down_sets = [*common, *downstream_sets(down)]  # dense: no sparsity
    ckpt = pt / f"checkpoint_{n}.mdl"
    before = _downstream_before(ft0, down_sets, ckpt)
    lap("downstream_before")
    if not _trained(ft, ft_steps):  # an interrupted fine-tuning resumes from its own model_dir
        ft_sets = [*down_sets, *(s.format(steps=ft_steps) for s in FINETUNE)]
        _cli(["--mode", "train_and_eval", "--params", str(CONFIG), "--model_dir", str(ft), "--checkpoint_path",
              str(ckpt), *_sets(ft_sets)], log)
        _check_trained(ft, ft_steps, log)
    lap("finetune")
    pre_run = compare.read_run(pt)
    s, train = pre_run.summary(), pre_run.train[-1]
    random40 = eval_both_ways(down_sets, ft / f"checkpoint_{ft_steps}.mdl") if both_estimators else []
    lap("random_batches")
    return Result(width, seed, arm, int(s["steps"]), float(s["time_s"]), float(s["flops_sparse"] or 0.0),
                  float(s["tokens_per_s"]), float(train.get("flops_ratio", 1.0)), _last_eval(pt), before,
                  _last_eval(ft), random40, wall)


def format_table(results: list[Result]) -> str:
    dense = {(r.width, r.seed): r for r in results if r.arm == "dense"}
    lines = ["| width | seed | arm | steps | time s | FLOPs | pre-train eval | downstream before FT | after dense FT | "
             "after FT - dense | after FT, 40 random batches (min-max of draws) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = dense.get((r.width, r.seed))
        diff = f"{r.downstream_after - d.downstream_after:+.4f}" if d else "-"
        rnd = f"{min(r.after_random):.4f}-{max(r.after_random):.4f}" if r.after_random else "-"
        lines.append(f"| {r.width} | {r.seed} | {r.arm} | {r.steps} | {r.time_s:.1f} | {f'{r.flops:.3g}' if r.flops else '-'} | "
                     f"{r.pretrain_eval:.4f} | {r.downstream_before:.4f} | {r.downstream_after:.4f} | {diff} | {rnd} |")
    return "\n".join(lines)


def repeat_arms(arms: list[str], first: list[Result], close: float) -> list[str]:
    """The arms a later seed runs: dense, and each arm whose first-seed difference to dense after
    fine-tuning (same width) is under ``close`` in size, with the equal-steps arm an equal-FLOPs
    or equal-time arm is scaled from. A difference far beyond the run-to-run spread (0.010-0.014
    for dense, same seed, BENCHMARKS.md) reads the same at any seed; a close one needs a second."""
    dense = next((r for r in first if r.arm == "dense"), None)
    diff = {r.arm: abs(r.downstream_after - dense.downstream_after) for r in first} if dense else {}
    keep = {"dense"} | {arm for arm in arms if diff.get(arm, 0.0) < close}
    keep |= {ARMS[arm][0] for arm in keep if ARMS[arm][1] in ("flops", "time")}
    return [arm for arm in arms if arm in keep]


# Bumped when a recorded figure changes meaning (2: training time without each attempt's
# compilation, compare.training_time), so that results of older code are not read back as done.
RESULTS_FORMAT = 2


def study_settings(a, device: str) -> dict:
    """What an arm's result depends on besides its width, seed and arm: the steps, the overrides,
    the estimators asked for, the GPU (equal-time arms are scaled by tokens/s) and the format."""
    return {"steps": a.steps, "ft_steps": a.ft_steps, "sets": a.sets, "both_estimators": a.both_estimators,
            "device": device, "format": RESULTS_FORMAT}


def claim_out(out: Path, settings: dict) -> None:
    """``OUT/settings.json``: the settings the runs under OUT were trained with. A study of other
    settings into the same OUT would find finished runs there and read them back as its own, so
    it is refused in one line."""
    path = out / "settings.json"
    if path.exists():
        held = json.loads(path.read_text())
        if held != settings:
            changed = ", ".join(f"{k}: {held.get(k)!r} -> {settings.get(k)!r}" for k in settings if held.get(k) != settings.get(k))
            raise SystemExit(f"spdf_study: {out} holds runs of other settings ({changed}); give another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))


def kept_results(path: Path, settings: dict) -> dict[tuple[int, int, str], Result]:
    """The arms ``path`` (``OUT/results.jsonl``) holds for these ``settings`` (``study_settings``):
    a rerun into the same OUT, also on another machine with only this file carried over (the
    same GPU model), takes them as done. Lines of other settings (or without any) are not used;
    a torn or foreign line is skipped with a warning."""
    kept = {}
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if record.pop("settings", None) == settings:
                    r = Result(**record)
                    kept[(r.width, r.seed, r.arm)] = r
            except (ValueError, TypeError, AttributeError) as e:
                print(f"spdf_study: {path}:{number} skipped (not a result line: {e})", file=sys.stderr)
    return kept


def append_result(path: Path, r: Result, settings: dict) -> None:
    """One line for ``r``, on a line of its own even after a torn last line."""
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps({**r.__dict__, "settings": settings}) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/spdf_study"))
    ap.add_argument("--widths", default="768,1024")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ft_steps", type=int, default=100)
    ap.add_argument("--arms", help=f"the arms of every width (of {', '.join(ARMS)}); by default every arm but "
                    "the plain loop at the widest width and dense, blocks and 2:4 at the others (width_arms)")
    ap.add_argument("--close", type=float, default=0.1,
                    help="seeds after the first run only the arms whose first-seed difference to dense after "
                         "fine-tuning is under this (repeat_arms); 0 runs dense alone again, a large value every arm")
    ap.add_argument("--both_estimators", action="store_true",
                    help="score every fine-tuned arm also nanoGPT's way (40 random batches, 5 draws); by default "
                         "only dense and the plain loop, the pair the estimator question is about")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="an override for every run (e.g. model.preset=gpt2-tiny for a CPU smoke run)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    arms = a.arms.split(",") if a.arms else None
    unknown = [x for x in arms or [] if x not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {', '.join(unknown)} (valid: {', '.join(ARMS)})")
    widths, seeds = [int(w) for w in a.widths.split(",")], [int(x) for x in a.seeds.split(",")]
    bad = [w for w in widths if w not in WIDTHS]
    if bad:
        ap.error(f"--widths: {bad[0]} is not one of {', '.join(map(str, WIDTHS))}")
    import torch

    settings = study_settings(a, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    claim_out(a.out, settings)
    data = split_stdlib(a.out / "data")
    kept = kept_results(a.out / "results.jsonl", settings)
    results: list[Result] = []
    started, ran = time.perf_counter(), 0
    for seed in seeds:  # every width at the first seed first: a study cut short still compares widths
        for width in widths:
            done: dict[str, Result] = {}
            these = width_arms(arms, width, widths)
            seed_arms = these if seed == seeds[0] else repeat_arms(
                these, [r for r in results if (r.width, r.seed) == (width, seeds[0])], a.close)
            order = sorted(seed_arms, key=lambda x: ARMS[x][1] in ("flops", "time"))  # the others scale equal-steps runs
            for arm in order:
                if ARMS[arm][1] in ("flops", "time") and f"w{width}_s{seed}_{ARMS[arm][0]}" not in done:
                    raise SystemExit(f"spdf_study: arm {arm} needs the arm {ARMS[arm][0]} in --arms")
                if ARMS[arm][1] == "time" and f"w{width}_s{seed}_dense" not in done:
                    raise SystemExit(f"spdf_study: arm {arm} needs the arm dense in --arms")
                r = kept.get((width, seed, arm))
                source = f"wall {r.wall_s} of the earlier run, read back" if r else ""
                if r is None:
                    both = a.both_estimators or arm == "dense"
                    r = run_arm(a.out, a.sets, width, seed, arm, a.steps, a.ft_steps, data, done, both)
                    append_result(a.out / "results.jsonl", r, settings)  # as they come: a run cut short keeps its arms
                    ran += 1
                    source = f"wall {r.wall_s}"
                done[f"w{width}_s{seed}_{arm}"] = r
                results.append(r)
                print(f"[{time.perf_counter() - started:6.0f} s] w{width} seed {seed} {arm:<20} steps {r.steps:>6}  "
                      f"pre-train {r.pretrain_eval:.4f}  downstream {r.downstream_before:.4f} -> "
                      f"{r.downstream_after:.4f}  {source}", flush=True)
    table = format_table(results)
    print(table)
    if a.json:
        a.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    print(f"spdf_study: {len(results)} arms in {time.perf_counter() - started:.0f} s "
          f"({ran} run here, the others read back)")
    first = (max(r.width for r in results), seeds[0])
    pre_runs = [a.out / "runs" / f"w{first[0]}_s{first[1]}_{r.arm}" for r in results
                if (r.width, r.seed) == first and ARMS[r.arm][1] != "loop"]  # the loop writes no model_dir
    try:
        compare.compare_runs([str(p) for p in pre_runs], x="time", out=a.out / "compare.png")
    except UserError as e:  # matplotlib missing (a GPU image without the [plot] extra): the table stands
        print(f"spdf_study: {a.out / 'compare.png'} not drawn ({e}); draw it later with: sparsetrain compare "
              f"--x time --out compare.png {' '.join(map(str, pre_runs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
