"""``sparsetrain compare RUN_DIR...``: runs side by side, from what each run left in its
model_dir, and ``model_dir/loss.png`` at the end of every training.

Everything is read from ``metrics.jsonl`` (the records the README's Outputs section lists) and
the sparsity block of ``params.yaml``: nothing needs the model, the data or a checkpoint, so a
run copied off a GPU machine compares on a laptop. Per step the last record wins (``eval``
appends a step it evaluates again; a resume moves a killed attempt's records aside), and a torn
or foreign line is skipped with a warning naming the file and line.

The x axes: ``steps``; ``tokens`` (seen so far); ``flops``, the training FLOPs actually spent
(``flops_total``: the sparse count, summed step by step, so dynamic densities and RigL's dense
steps count); ``time``, the training time, Σ Δtokens / tokens_per_s over the logged intervals,
so pauses, restarts, evaluations and checkpoint writes do not count, nor compilation (each
attempt's first interval counts at the median rate of the others: ``training_time``). Eval points sit on the
train curve's x at their step (interpolated between logged steps).

The table's tokens/s is the median of the logged values (the first interval, which holds the
compilation, weighs no more than any other); sparsity is the masks' share of pruned entries
over the sparsified tensors, after the last dynamic update where there is one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsetrain.errors import UserError

log = logging.getLogger("sparsetrain")

AXES = {"steps": "step", "tokens": "tokens", "flops": "training FLOPs (sparse count)", "time": "training time (s)"}
PLOT_EXTRA = "pip install 'sparsetrain[plot]'"


@dataclass
class Run:
    """One run's records, each kind deduplicated by step (the last wins) and sorted by step."""

    name: str
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    sparsity: dict[str, Any] | None = None  # the first sparsity record
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> last sparsity_update
    structure: str = "dense"

    def x(self, axis: str) -> list[float]:
        """The train records' x values on ``axis``."""
        if axis == "steps":
            return [float(r["step"]) for r in self.train]
        if axis == "tokens":
            return [float(r.get("tokens", 0)) for r in self.train]
        if axis == "flops":
            return [float(r.get("flops_total", 0.0)) for r in self.train]
        return training_time(self.train)

    def eval_x(self, axis: str) -> list[float]:
        """Eval steps placed on the train curve's ``axis`` (linear between logged steps; an eval
        before the first logged step lies on the line from the origin)."""
        steps = [0.0] + [float(r["step"]) for r in self.train]
        xs = [0.0] + self.x(axis)
        return [_interp(float(e["step"]), steps, xs) for e in self.eval]

    def summary(self) -> dict[str, Any]:
        last = self.train[-1]
        last_eval = self.eval[-1] if self.eval else None
        rates = [r["tokens_per_s"] for r in self.train if _number(r.get("tokens_per_s"))]
        return {
            "run": self.name, "steps": last["step"], "tokens": last.get("tokens"),
            "train_loss": last.get("loss"),
            "eval_loss": last_eval["eval_loss"] if last_eval else None,
            "eval_step": last_eval["step"] if last_eval else None,
            "eval_loss_tokens": last_eval.get("eval_loss_tokens", "all") if last_eval else None,
            "flops_sparse": last.get("flops_total"), "flops_dense": last.get("flops_total_dense"),
            "tokens_per_s": statistics.median(rates) if rates else None,
            "time_s": training_time(self.train)[-1],
            "sparsity": self.sparsity_level(), "structure": self.structure,
        }

    def sparsity_level(self) -> float:
        """Pruned share of the sparsified tensors' entries (0.0 for a dense run)."""
        if not self.sparsity:
            return 0.0
        numel = pruned = 0.0
        for g in self.sparsity.get("groups", []):
            n = float(g.get("numel", 0))
            update = self.updates.get(g.get("group"))
            level = float(update["sparsity"]) if update and _number(update.get("sparsity")) else float(g.get("mask", 0.0))
            numel, pruned = numel + n, pruned + n * level
        return pruned / numel if numel else 0.0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def training_time(train: list[dict[str, Any]]) -> list[float]:
    """Seconds of training at each train record: Σ Δtokens / tokens_per_s over the intervals
    between logged steps (the first from step 0). Checkpoint writes and evaluations between steps
    are outside the intervals (``training.loop.fit``), as is the time between a kill and its
    resume. Compilation is not counted either: the first interval of each attempt (``warmup``,
    and the run's first record, which older runs did not mark) counts at the median rate of the
    other intervals, so that runs compiled cold and warm (one process running several) start
    together."""
    steady = [r["tokens_per_s"] for i, r in enumerate(train)
              if _rate(r) and not (i == 0 or r.get("warmup"))]
    typical = statistics.median(steady) if steady else None
    out, total, tokens = [], 0.0, 0.0
    for i, r in enumerate(train):
        now, rate = float(r.get("tokens", 0)), r.get("tokens_per_s")
        if (i == 0 or r.get("warmup")) and typical:
            rate = typical
        if _rate({"tokens_per_s": rate}) and now > tokens:
            total += (now - tokens) / rate
        tokens = now
        out.append(total)
    return out


def _rate(record: dict[str, Any]) -> bool:
    rate = record.get("tokens_per_s")
    return _number(rate) and rate > 0


def read_run(path: str | Path) -> Run:
    """A run from its model_dir; one line naming the path when it is not one."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise UserError(f"{path}: {'not a directory' if path.exists() else 'does not exist'}; "
                        "give the model_dir of a run (it holds metrics.jsonl)")
    if not metrics.is_file():
        raise UserError(f"{path}: holds no metrics.jsonl; is it the model_dir of a training run?")
    run = Run(name=str(path), path=path)
    by_kind: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "eval": {}}
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                kind, step = record.get("kind", "train"), int(record["step"])
            except (ValueError, TypeError, KeyError, AttributeError):
                log.warning("%s:%d: not a metrics record; skipped", metrics, number)
                continue
            if kind in by_kind:
                by_kind[kind][step] = record
            elif kind == "sparsity" and run.sparsity is None:
                run.sparsity = record
            elif kind == "sparsity_update" and isinstance(record.get("group"), str):
                run.updates[record["group"]] = record
    run.train = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    run.eval = [r for s, r in sorted(by_kind["eval"].items()) if _number(r.get("eval_loss"))]
    if not run.train:
        raise UserError(f"{metrics}: no train records (kind 'train'); compare needs a run that trained")
    run.structure = describe_structure(path / "params.yaml", run.sparsity is not None)
    return run


def describe_structure(params_yaml: Path, sparse: bool) -> str:
    """``dense``, or each group's structure and algorithm (``unstructured``, ``block 128x128``,
    ``2:4``, ``+ rigl``), from the run's own params.yaml; ``?`` where it cannot be read."""
    if not sparse:
        return "dense"
    from sparsetrain.config import parse_sparsity

    try:
        block = (yaml.safe_load(params_yaml.read_text(encoding="utf-8")) or {}).get("sparsity")
        config = parse_sparsity(block)
    except Exception:  # another version's params, a hand-edited file: the table says so, no more
        return "?"
    if config is None:
        return "dense"
    labels = []
    for g in config.groups:
        label = g.structure_label + ("" if g.algorithm == "static" else f" + {g.algorithm}")
        if label not in labels:
            labels.append(label)
    return ", ".join(labels)


FORMATS = {"int": "{:,.0f}", "loss": "{:.4f}", "e": "{:.3g}", "rate": "{:,.0f}", "time": "{:.1f}", "pct": "{:.1%}",
           "str": "{}"}


def _fmt(value: Any, kind: str) -> str:
    return "-" if value is None else FORMATS[kind].format(value)


COLUMNS = [("run", "run", "str"), ("steps", "steps", "int"), ("tokens", "tokens", "int"),
           ("train loss", "train_loss", "loss"), ("eval loss", "eval_loss", "loss"),
           ("FLOPs sparse", "flops_sparse", "e"), ("FLOPs dense", "flops_dense", "e"),
           ("tokens/s", "tokens_per_s", "rate"), ("time s", "time_s", "time"),
           ("sparsity", "sparsity", "pct"), ("structure", "structure", "str")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns, one line per run; text columns left, numbers right."""
    cells = [[title for title, _, _ in COLUMNS]]
    cells += [[_fmt(row[key], kind) for _, key, kind in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for line in cells:
        parts = [c.ljust(w) if COLUMNS[i][2] == "str" else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
    masked = [row["run"] for row in rows if row.get("eval_loss_tokens") == "completion"]
    if masked:
        lines.append(f"eval loss of {', '.join(masked)}: completion tokens only (the data's loss mask)")
    return "\n".join(lines)


def _figure():
    """A matplotlib Figure drawn by Agg, without pyplot: no display, no global backend switched
    under a caller (a notebook keeps its own), nothing to close."""
    try:
        import matplotlib  # noqa: F401 -- first: ImportError here where it is not installed
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"--out: drawing needs matplotlib: {PLOT_EXTRA}") from None
    return Figure(figsize=(6.4, 4.0), dpi=100)  # Figure.savefig renders with Agg for .png


def draw(runs: list[Run], axis: str, out: Path, title: str | None = None) -> None:
    """Train loss against ``axis``, one line per run, its eval points as markers of its colour."""
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.parent} does not exist")
    fig = _figure()
    ax = fig.subplots()
    for run in runs:
        (line,) = ax.plot(run.x(axis), [r.get("loss") for r in run.train], label=run.name, lw=1.2)
        if run.eval:
            ax.plot(run.eval_x(axis), [e["eval_loss"] for e in run.eval], "o", ms=4, color=line.get_color())
    if any(run.eval for run in runs):
        ax.plot([], [], "o", ms=4, color="0.4", label="eval loss (markers)")
    ax.set_xlabel(AXES[axis])
    ax.set_ylabel("loss (nats/token)")
    if axis == "flops":
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    ax.set_title(title or f"loss against {axis}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror or e})") from None


def compare_runs(paths: list[str], x: str = "flops", out: str | Path | None = None, as_json: bool = False) -> int:
    """The ``compare`` command: the table (or JSON) on stdout, the picture into ``out``."""
    if x not in AXES:
        raise UserError(f"--x {x!r}: choose one of {', '.join(AXES)}")
    runs = [read_run(p) for p in paths]
    rows = [run.summary() for run in runs]
    # The table first: it stands whatever becomes of the picture (matplotlib missing, a bad --out).
    if as_json:
        print(json.dumps({"x": x, "out": None if out is None else str(out), "runs": rows}, indent=2), flush=True)
    else:
        print(format_table(rows), flush=True)
    if out is not None:
        draw(runs, x, Path(out))
        if not as_json:
            print(f"wrote {out} (loss against {x})")
    return 0


def write_loss_png(model_dir: str | Path) -> Path | None:
    """``model_dir/loss.png`` (loss against steps) at a training's end. Never raises: a run must
    not fail for its picture (matplotlib missing, nothing logged, a full disk: one log line).
    ``SPARSETRAIN_LOSS_PNG=0`` in the environment skips it (a sweep of many short runs; the
    test suite, where it would add a fifth of a second to every training)."""
    if os.environ.get("SPARSETRAIN_LOSS_PNG", "1") == "0":
        return None
    path = Path(model_dir) / "loss.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.info("loss.png not drawn: matplotlib is not installed (%s)", PLOT_EXTRA)
        return None
    try:
        run = read_run(model_dir)
        draw([run], "steps", path, title=f"{Path(model_dir).name}: loss against steps")
    except Exception as e:  # noqa: BLE001 - the picture is a courtesy
        log.info("loss.png not drawn: %s", e)
        return None
    return path
