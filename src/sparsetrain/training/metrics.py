"""Run outputs: ``metrics.jsonl``, TensorBoard events, the trackers and the log file.

Every logged training step and every evaluation becomes one JSON object on its own line of
``model_dir/metrics.jsonl`` (schema in the README) and the same numbers go to TensorBoard under
``train/*``, ``eval/*`` and ``sparsity/*``, and to wandb or MLflow when ``runconfig.loggers``
lists them (:mod:`sparsetrain.training.trackers`). Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsetrain.checkpoint import write_reason

log = logging.getLogger("sparsetrain")

TB_KEYS = {
    "train": ("loss", "lr", "tokens_per_s", "flops_per_step", "flops_ratio", "mfu"),
    "eval": ("eval_loss", "perplexity"),
}


def check_metrics_file(model_dir: Path) -> Path:
    """model_dir/metrics.jsonl, which must be a regular file where it exists (or a link to one):
    a FIFO or a device (``/dev/full`` reads without end) would block or exhaust memory."""
    path = Path(model_dir) / "metrics.jsonl"
    if path.exists() and not path.is_file():
        from sparsetrain.errors import UserError

        what = "a directory" if path.is_dir() else "not a regular file (a FIFO, device or socket)"
        raise UserError(f"{path}: cannot write metrics ({what}); move it away")
    return path


class MetricsWriter:
    """Appends records to metrics.jsonl and to the ``loggers`` asked for; a no-op when ``enabled``
    is false.

    metrics.jsonl is always written, ``jsonl`` listed or not: resume, ``compare`` and loss.png
    read it. ``run_id`` stamps every record with the run's lineage (see
    :mod:`sparsetrain.training.model_dir`) and names the tracker runs, so a resume continues them;
    ``purge_step`` (a resume's step) makes TensorBoard drop the events of later steps that an
    earlier, killed or rolled-back attempt wrote, as metrics.jsonl's are moved aside. A tracker
    that fails mid-run is dropped with one warning: the run never stops for its dashboards."""

    def __init__(self, model_dir: Path, enabled: bool = True,
                 purge_step: int | None = None, run_id: str | None = None,
                 loggers: Sequence[str] = ("jsonl", "tensorboard"), run_config: dict | None = None) -> None:
        from sparsetrain.training import trackers

        self.enabled = enabled
        self.run_id = run_id
        self._file = None
        self._tb = None
        self._trackers: dict[str, Any] = {}
        if not enabled:
            return
        extra = [name for name in loggers if name in trackers.PACKAGES]
        trackers.require(extra)  # before any file is opened
        path = check_metrics_file(model_dir)
        try:  # the trackers first: one that cannot start leaves no files of a run that never ran
            for name in extra:
                self._trackers[name] = trackers.open_tracker(name, model_dir, run_id, run_config)
            if "tensorboard" in loggers:
                from torch.utils.tensorboard import SummaryWriter  # slow import; only where used

                # purge_step 0 would drop nothing TensorBoard keeps apart from a fresh start anyway.
                self._tb = SummaryWriter(log_dir=str(model_dir), purge_step=purge_step or None)
            self._file = self._open(path)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(path: Path):
        try:
            return open(path, "a", encoding="utf-8")
        except OSError as e:
            from sparsetrain.errors import UserError

            raise UserError(f"{path}: cannot write metrics ({write_reason(e)})") from None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.run_id is not None:
            record = {**record, "run_id": self.run_id}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as e:
            from sparsetrain.errors import UserError

            raise UserError(f"{self._file.name}: cannot write metrics ({write_reason(e)})") from None
        step = record["step"]
        kind = record.get("kind", "train")
        if self._tb is not None:
            for key in TB_KEYS.get(kind, ()):
                if _is_number(record.get(key)):
                    self._tb.add_scalar(f"{kind}/{key.removeprefix('eval_')}", record[key], step)
        if self._trackers:
            self._track(tracked_scalars(record), step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)
        if self._trackers:
            self._track({tag: value}, step)

    def _track(self, values: dict[str, float], step: int) -> None:
        if not values:
            return
        for name, tracker in list(self._trackers.items()):
            try:
                tracker.log(values, step)
            except Exception as e:  # a dashboard's failure is not the run's
                from sparsetrain.training.trackers import one_line

                log.warning("runconfig.loggers: %s failed at step %d (%s); it logs nothing more in this run",
                            name, step, one_line(e))
                del self._trackers[name]
                _close_quietly(tracker)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # a full disk at the last flush: every record was flushed as written
                pass
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        trackers, self._trackers = self._trackers, {}
        for name, tracker in trackers.items():
            if not _close_quietly(tracker):
                log.warning("runconfig.loggers: %s could not finish its run; what it logged may be incomplete", name)


def tracked_scalars(record: dict[str, Any]) -> dict[str, float]:
    """What the trackers get of a train or eval record: every number in it, named as TensorBoard
    names them (``train/loss``, ``eval/loss``, ``eval/tokens``); the step is their x axis. Other
    kinds reach the trackers through :meth:`MetricsWriter.scalar`, as TensorBoard's ``sparsity/*``."""
    kind = record.get("kind", "train")
    if kind not in TB_KEYS:
        return {}
    return {f"{kind}/{key.removeprefix('eval_')}": float(value) for key, value in record.items()
            if key not in ("step", "kind") and _is_number(value)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close_quietly(tracker: Any) -> bool:
    try:
        tracker.close()
        return True
    except Exception:
        return False


def move_records_after(path: Path, step: int, dest: Path) -> int:
    """Move the records of ``path`` (a metrics.jsonl) whose step is after ``step`` to the end of
    ``dest``; the rest stays, rewritten atomically with its mode. Returns how many moved. Lines
    that are not JSON records stay where they are, byte for byte (invalid UTF-8 too: a torn or
    foreign line must not stop a resume). A symlinked metrics.jsonl stays a link: its target is
    rewritten."""
    path, dest = Path(path).resolve(), Path(dest)
    try:
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(keepends=True)
    except OSError:  # missing or unreadable: nothing here to move
        return 0
    keep, move = [], []
    for line in lines:
        try:
            later = int(json.loads(line).get("step", -1)) > step
        except (ValueError, TypeError, AttributeError):
            later = False
        (move if later else keep).append(line if line.endswith("\n") else line + "\n")
    if not move:
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "a", encoding="utf-8", errors="surrogateescape") as f:
        f.writelines(move)
        f.flush()
        os.fsync(f.fileno())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(move)


class _LogFile(logging.FileHandler):
    """train.log that, once a write fails (disk full, file gone read-only), says so in one line on
    stderr and stops writing, instead of logging's traceback for every later record: the run goes
    on on the console (a checkpoint that cannot be written is what stops it)."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        reason = write_reason(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
        sys.stderr.write(f"warning: {self.baseFilename}: cannot write the log ({reason}); "
                         "logging to the console only from here\n")
        log.removeHandler(self)
        try:
            self.close()
        except OSError:
            pass


def setup_logging(model_dir: Path | None, verbose: bool = True) -> None:
    """Log INFO to stderr and, given a model_dir, to ``model_dir/train.log`` (a file that cannot be
    opened is one error line; one that fails later is dropped with a warning, see :class:`_LogFile`)."""
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    log.addHandler(console)
    if model_dir is not None:
        path = Path(model_dir) / "train.log"
        try:
            fh = _LogFile(path, encoding="utf-8")
        except OSError as e:
            from sparsetrain.errors import UserError

            raise UserError(f"{path}: cannot write the log ({write_reason(e)})") from None
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    log.propagate = False
