"""One run per model_dir: who writes there (a lock), which checkpoint a command starts from, and
one history of checkpoints and metrics that resumes, pruning and the summary follow.

**The lock.** A training or evaluation holds ``model_dir/.sparsetrain.lock`` (``flock``) for its
whole life; a second one on the same model_dir stops at once with a line naming the holder (pid,
host, command, start time, written in the file). The kernel releases the lock of a process that
dies however it dies, so a stale lock from a killed run is no obstacle and needs no clean-up.
(``flock`` is not reliable on some network file systems: there the lock is advisory at best.)

**Where a command starts** (:func:`choose_start`):

- no ``--checkpoint_path``: the newest checkpoint of model_dir, a full resume (or step 0);
- ``--checkpoint_path`` naming one of model_dir's checkpoints (``checkpoint_<step>.mdl``): a full
  resume from it; one that is not the newest is a *rollback*. Re-running the same rollback after
  an interruption resumes the newest checkpoint written since (each records the checkpoint its
  history branched from) instead of rolling back again;
- any other ``--checkpoint_path`` (another directory, or a file of model_dir with another name,
  such as ``finalize``'s ``dense.mdl``): a *warm start* (weights only, step 0) into a model_dir that
  holds no checkpoints. Re-running the same warm start after an interruption resumes its own
  newest checkpoint (each checkpoint records the warm start it descends from); a model_dir
  holding another run's checkpoints is refused, never mixed.

**One history** (:func:`settle`). A training that starts at step S moves what model_dir holds from
after S -- checkpoints of later steps (a rollback) and metrics records of later steps (a run
killed after its last checkpoint, or a rollback) -- into ``model_dir/abandoned/<time>-from-step-S/``.
Nothing is deleted; model_dir then holds one history, so ``keep_checkpoints`` prunes the run's own
checkpoints, the next resume picks its newest, and metrics.jsonl holds each step once. Every
checkpoint and metrics record carries the run's ``run_id``: made at a fresh or warm start, kept by
every resume of it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sparsetrain import checkpoint as ckpt
from sparsetrain.errors import CheckpointError, UserError

log = logging.getLogger("sparsetrain")

LOCK_NAME = ".sparsetrain.lock"
ABANDONED = "abandoned"


# -- the lock --------------------------------------------------------------------------------------


class ModelDirLock:
    """The one-writer lock of a model_dir (see the module docstring); release with :meth:`release`
    or by the process's end."""

    def __init__(self, model_dir: Path) -> None:
        self.path = Path(model_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, command: str) -> ModelDirLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the model_dir's lock ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"{self.path.parent}: in use by another sparsetrain process ({holder}); wait for it to end, "
                "or give this command another --model_dir (to evaluate a checkpoint of a running training, "
                "pass it as --checkpoint_path with another --model_dir)"
            ) from None
        except OSError as e:  # a file system without locks: say so, go on without one
            log.warning("%s: cannot lock (%s): two commands on this model_dir would not be stopped",
                        self.path, e.strerror or e)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without its description
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock; the file stays, harmless
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {record['pid']} on {record['host']}, `{record['command']}`, since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its description is unreadable"


def command_line() -> str:
    """This process's command line, shortened, for the lock's description."""
    text = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return text if len(text) <= 300 else text[:297] + "..."


# -- where a command starts ------------------------------------------------------------------------


@dataclass
class Start:
    """The checkpoint a command loads and what loading it means."""

    path: Path | None
    full_resume: bool
    kind: str  # "fresh" | "resume" | "rollback" | "rollback resumed" | "warm start" | "warm start resumed"
    note: str = ""  # said in the log when set


def choose_start(model_dir: Path, explicit: Path | None, init_from: Path | None = None) -> Start:
    """The checkpoint to load (see the module docstring), refusing a warm start into another run's
    model_dir. Reads only the metadata of model_dir's newest checkpoint, and only for a warm start.
    ``init_from`` (``model.init_from``'s directory) is the warm start of a run given no
    ``--checkpoint_path``; its resumes follow from model_dir's checkpoints."""
    model_dir = Path(model_dir)
    found = ckpt.list_checkpoints(model_dir)
    if init_from is not None:
        own = explicit is not None and inside(explicit, model_dir) and ckpt.CHECKPOINT_RE.match(Path(explicit).name)
        if explicit is not None and not own:
            raise UserError(f"--checkpoint_path {explicit} and model.init_from {init_from}: two starting points; give one")
        if explicit is None and not found:
            return Start(Path(init_from), False, "warm start")
        origin = (ckpt.peek(found[-1][1], ("warm_start_from",)).get("warm_start_from") or {}).get("path")
        if explicit is None and origin != str(Path(init_from).resolve()):
            raise UserError(
                f"model.init_from: {init_from}: {model_dir} holds checkpoints of a run that did not start from it "
                f"({', '.join(p.name for _, p in found[-3:])}); give a new --model_dir"
            )
    if explicit is None:
        return Start(found[-1][1], True, "resume") if found else Start(None, True, "fresh")
    explicit = Path(explicit)
    if not explicit.exists():  # before any note about what loading it would do
        hint = "; to resume the run there, drop --checkpoint_path" if found else ""
        raise CheckpointError(f"--checkpoint_path {explicit}: no such file{hint}")
    m = ckpt.CHECKPOINT_RE.match(explicit.name)
    if inside(explicit, model_dir) and m:  # one of the run's own checkpoints
        later = [(s, p) for s, p in found if s > int(m.group(1))]
        if not later:
            return Start(explicit, True, "resume")
        newest = later[-1][1]
        if (ckpt.peek(newest, ("branch_from",)).get("branch_from") or {}).get("path") == str(explicit.resolve()):
            return Start(newest, True, "rollback resumed",
                         f"{newest.name} continues the rollback to {explicit.name}: resuming it (to roll back "
                         f"to {explicit.name} again, move the later checkpoints out of {model_dir} first)")
        names = ", ".join(p.name for _, p in later)
        return Start(explicit, True, "rollback",
                     f"rolling back to {explicit.name}: the later checkpoints ({names}) are moved "
                     f"to {model_dir / ABANDONED}/ when training starts")
    if not found:
        return Start(explicit, False, "warm start")
    newest = found[-1][1]
    origin = (ckpt.peek(newest, ("warm_start_from",)).get("warm_start_from") or {}).get("path")
    if origin == str(explicit.resolve()):
        return Start(newest, True, "warm start resumed",
                     f"{model_dir} holds this warm start's checkpoints (from {explicit}): resuming {newest.name}")
    names = ", ".join(p.name for _, p in found[-3:])
    raise UserError(
        f"--checkpoint_path {explicit}: a warm start needs a model_dir without checkpoints, and {model_dir} "
        f"holds another run's ({names}); give a new --model_dir, or drop --checkpoint_path to resume the run there"
    )


def inside(path: Path, model_dir: Path) -> bool:
    return Path(path).resolve().parent == Path(model_dir).resolve()


def check_step_name(path: Path, stored_step: int) -> None:
    """A checkpoint named ``checkpoint_<N>.mdl`` must hold step N: a copied or renamed file would
    rewind every later resume, which would then overwrite newer checkpoints."""
    m = ckpt.CHECKPOINT_RE.match(Path(path).name)
    if m and int(m.group(1)) != stored_step:
        raise CheckpointError(
            f"{path}: holds step {stored_step}, not {m.group(1)} as its name says (copied or renamed?); "
            f"rename it checkpoint_{stored_step}.mdl, or move it out of the model_dir"
        )


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


# -- one history -----------------------------------------------------------------------------------


def settle(model_dir: Path, step: int) -> Path | None:
    """Move checkpoints and metrics records of steps after ``step`` into ``abandoned/``; returns
    that folder, or None when nothing was there to move. Rank 0 only, before training starts."""
    from sparsetrain.training.metrics import check_metrics_file, move_records_after

    model_dir = Path(model_dir)
    later = [(s, p) for s, p in ckpt.list_checkpoints(model_dir) if s > step]
    metrics = check_metrics_file(model_dir)
    dest = model_dir / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-from-step-{step}"
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('~')[0]}~{n}")
        n += 1
    try:
        if later:
            dest.mkdir(parents=True)
        for _, p in later:
            os.replace(p, dest / p.name)
        moved = move_records_after(metrics, step, dest / "metrics.jsonl")  # makes dest when it moves any
    except OSError as e:
        raise UserError(f"{dest}: cannot move the files of steps after {step} there ({e.strerror or e}); "
                        "nothing was deleted") from None
    if not later and not moved:
        return None
    parts = []
    if later:
        parts.append(f"{len(later)} checkpoint{'s' if len(later) > 1 else ''} ({', '.join(p.name for _, p in later)})")
    if moved:
        parts.append(f"{moved} metrics record{'s' if moved > 1 else ''}")
    log.warning("starting at step %d: %s of later steps moved to %s (a rolled-back or killed run's; nothing deleted)",
                step, " and ".join(parts), dest)
    return dest


    return False
