"""Checkpoint files: ``model_dir/checkpoint_<step>.mdl``.

A checkpoint is a plain dict, loadable with ``torch.load(weights_only=True)`` (no pickled code):
``model`` (state dict keyed by the model's own parameter names), ``optimizer``, ``lr_scheduler``,
``global_step``, ``rng`` and ``params`` (the resolved params). Sparse runs store NaN at pruned
positions (see :mod:`sparsetrain.sparsity.nan_format`). Writes are atomic: the data goes to a
hidden temporary file in the same directory, is flushed to disk, and is renamed over the final
name, so a run killed mid-save leaves every earlier checkpoint intact and no partial file that
looks like a checkpoint. The temporary file's name carries its writer (host and process id), so a
save never removes another living process's file; checkpoints get the umask's permissions, like
every other output.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsetrain.errors import CheckpointError
from sparsetrain.tensor_tree import map_tensors

log = logging.getLogger("sparsetrain")

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.mdl$")
# The hidden temporary file a save writes before its rename:
# ``.<name>.<host>.<pid>.<random>.tmp`` (older versions: ``.<name>.<random>.tmp``).
TEMP_RE = re.compile(r"^\.checkpoint_\d+\.mdl\..+\.tmp$")
WRITER_TEMP_RE = re.compile(r"^\..+\.(mdl|safetensors)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
OLD_TEMP_AGE_S = 24 * 3600  # a temporary file without its writer's name: stale once this old
REQUIRED_KEYS = ("model", "global_step")
# Optional top-level entries and the type each must have when present.
OPTIONAL_DICTS = ("optimizer", "lr_scheduler", "rng", "params")
_WRITE_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EIO: "I/O error",
}


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, permission denied, ...); a user error (exit 2)
    that is also an ``OSError`` with the original ``errno``."""


def write_reason(exc: OSError) -> str:
    """An OSError of a write in a few words: "disk full", "permission denied", ..."""
    return _WRITE_REASONS.get(exc.errno) or exc.strerror or str(exc) or type(exc).__name__


def _write_error(path: Path, exc: OSError) -> CheckpointWriteError:
    code = errno.errorcode.get(exc.errno) if exc.errno is not None else None
    reason = write_reason(exc)
    detail = f"{reason} ({code})" if code else reason
    err = CheckpointWriteError(
        f"{path}: cannot write checkpoint: {detail}; nothing was written, the earlier checkpoints are intact"
    )
    err.errno = exc.errno
    return err


class _Sink:
    """A file wrapper that remembers the first ``OSError`` of a write: ``torch.save`` turns it into
    a ``RuntimeError`` without the errno ("unexpected pos ...")."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def _in_chain(exc: BaseException | None, kinds: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``'s cause/context chain (``exc`` included)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that caused ``exc``, if any."""
    return _in_chain(exc, OSError)


def _exit_in(exc: BaseException) -> BaseException | None:
    """A SystemExit / KeyboardInterrupt (a signal handler's) that caused ``exc``, if any."""
    return _in_chain(exc, (SystemExit, KeyboardInterrupt))


def checkpoint_path(model_dir: Path, step: int) -> Path:
    return Path(model_dir) / f"checkpoint_{step}.mdl"


def list_checkpoints(model_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints in ``model_dir`` as (step, path), oldest first."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = []
    for p in model_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(model_dir: Path) -> Path | None:
    found = list_checkpoints(model_dir)
    return found[-1][1] if found else None


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename).

    A write that fails (disk full, permission denied, I/O error) raises
    :class:`CheckpointWriteError` (a user error naming the path and the reason, and an
    ``OSError``); its temporary file is removed and earlier checkpoints are untouched. Temporary
    files left by a process killed mid-save are removed after the next successful save.
    """
    state = on_cpu(state)
    write_atomically(Path(path), lambda f: torch.save(state, f))


def write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Have ``write(file)`` fill a hidden temporary file beside ``path`` (named after its writer:
    host and pid), flush it to disk and rename it over ``path``: a reader never sees a partial
    file, and a failed write leaves what was at ``path`` as it was. Errors as
    :func:`save_checkpoint`'s."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    sink = None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a checkpoint is as readable as the other outputs
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            write(sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        exit_ = _exit_in(e)
        if exit_ is not None and exit_ is not e:  # torch.save wraps a SystemExit raised in a write
            raise exit_ from None
        cause = sink.error if sink is not None and sink.error is not None else None
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and (cause or _os_error_in(e))):
            raise _write_error(path, cause or _os_error_in(e)) from None
        raise
    fsync_path(path.parent)
    remove_stale_temp_files(path.parent)


def on_cpu(state: Any) -> Any:
    """``state`` with every tensor on the CPU, so that a checkpoint written on a GPU loads with a
    plain ``torch.load`` on a machine without one (FSDP's gathered state is on the CPU already).
    Tensors sharing GPU memory (a tied embedding and LM head) stay shared: one copy each."""
    copies: dict[tuple, torch.Tensor] = {}

    def move(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return x
        key = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
        if key not in copies:
            copies[key] = x.detach().cpu()
        return copies[key]

    return map_tensors(move, state)


def _host() -> str:
    """This machine's name as a temp-file field (no dots: they separate the fields)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's living process
        return True
    return True


def is_stale_temp(directory: Path, name: str) -> bool:
    """Whether ``name`` is a temporary checkpoint file of a save that can no longer finish: its
    writer (named in it) was a process of this host that is gone, or, for a name without its writer
    (older versions), it is over a day old. Another host's files are never judged stale."""
    m = WRITER_TEMP_RE.match(name)
    if m:
        return m["host"] == _host() and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
    if not TEMP_RE.match(name):
        return False
    try:
        return time.time() - (Path(directory) / name).stat().st_mtime > OLD_TEMP_AGE_S
    except OSError:
        return False


def remove_stale_temp_files(model_dir: Path) -> list[Path]:
    """Delete the hidden temporary files of saves that never finished (a process killed mid-save).

    Several processes may write into one directory (a training and a ``finalize -o`` beside its
    checkpoints), so only files whose writer is known to be gone are removed (:func:`is_stale_temp`).
    """
    removed = []
    try:
        names = os.listdir(model_dir)
    except OSError:
        return removed
    for name in names:
        if name.endswith(".tmp") and is_stale_temp(Path(model_dir), name):
            stale = Path(model_dir) / name
            try:
                stale.unlink()
                removed.append(stale)
            except OSError:
                pass
    return removed


def fsync_path(path: Path) -> None:
    """Flush a file or a directory (a rename in it) to disk; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


SAFETENSORS_FORMAT = "sparsetrain-dense"  # the "format" metadata of finalize's .safetensors
WRITER = "sparsetrain"  # the "writer" key of our checkpoints: marks them apart from the zoo's (same keys)
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"  # the signature of an HDF5 file (the zoo's cstorch.save container)


def is_safetensors(path: Path | str) -> bool:
    """Whether ``path`` has the safetensors layout: an 8-byte little-endian header length, then
    the JSON header (``{``) that fits in the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def load_safetensors(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` file as a weights-only checkpoint dict: ``model``, ``global_step`` and
    ``params`` from its metadata where ``finalize`` wrote them (step 0 otherwise), and
    ``weights_only: True`` -- it holds no optimizer, schedule or RNG state, so it can start a run
    (a warm start) but not continue one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        model = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: corrupt or truncated .safetensors file ({first[:200]})") from None
    state: dict[str, Any] = {"model": model, "global_step": 0, "weights_only": True}
    if meta.get("format") == SAFETENSORS_FORMAT:
        state["writer"] = WRITER
    try:
        state["global_step"] = max(0, int(meta.get("global_step", 0)))
        if "params" in meta:
            state["params"] = json.loads(meta["params"])
    except (TypeError, ValueError):
        pass  # another tool's metadata: the weights are what counts
    return state


def is_hdf5(path: Path | str) -> bool:
    """Whether ``path`` starts with the HDF5 signature (as ``cstorch.save``'s files do)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_MAGIC
    except OSError:
        return False


def check_regular_file(path: Path) -> None:
    """A checkpoint to read must be a regular file: a FIFO would block the read for ever."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket), expected a checkpoint file")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; any problem is one :class:`CheckpointError` naming the file."""
    path = Path(path)
    check_regular_file(path)
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        if is_safetensors(path):
            raise CheckpointError(f"{path}: a .safetensors file (weights only, e.g. finalize's), not a torch.save checkpoint")
        if is_hdf5(path):
            raise CheckpointError(f"{path}: a Cerebras HDF5 checkpoint (cstorch.save), not a torch.save archive")
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a torch.save archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain data "
            "(pickled code is never unpickled)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a sparsetrain checkpoint (expected keys {', '.join(REQUIRED_KEYS)})")
    problem = _layout_problem(state)
    if problem:
        raise CheckpointError(f"{path}: not a sparsetrain checkpoint ({problem})")
    return state


def _layout_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with the layout of a loaded checkpoint dict, or None."""
    model = state["model"]
    if not isinstance(model, dict):
        return "'model' is not a state dict"
    for key, value in model.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            return f"'model' entry {str(key)[:80]!r} is a {type(value).__name__}, not a tensor"
    step = state["global_step"]
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = state["global_step"] = int(step)  # the zoo saves it as a 0-d tensor
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'global_step' is {str(step)[:40]!r}, not a step number"
    for key in OPTIONAL_DICTS:
        if state.get(key) is not None and not isinstance(state[key], dict):
            return f"'{key}' is a {type(state[key]).__name__}, not a dict"
    opt = state.get("optimizer")
    if opt and not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        return "'optimizer' is not an optimizer state dict (keys state, param_groups)"
    for key in ("torch", "cuda"):  # the entries a resume restores
        value = (state.get("rng") or {}).get(key)
        if value is not None and not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8):
            return f"'rng.{key}' is not an RNG state (a uint8 tensor)"
    return None


def prune_checkpoints(model_dir: Path, keep: int | None, newest: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths.

    ``newest``: the step just written. Checkpoints of later steps are not this run's history (a
    resume moves them aside, see :mod:`sparsetrain.training.model_dir`): never counted, never
    deleted here."""
    if not keep:
        return []
    found = [(s, p) for s, p in list_checkpoints(model_dir) if newest is None or s <= newest]
    old = [(s, p) for s, p in found[:-keep]]
    deleted = []
    for s, p in old:
        try:  # an int (ours) or a 0-d tensor (the zoo's); anything else: not judged
            held = int(peek(p, ("global_step",))["global_step"])
        except (KeyError, TypeError, ValueError, RuntimeError):
            held = None
        if held is not None and held != s:  # renamed or copied: not the history its name claims
            log.warning("keep_checkpoints: %s holds step %d, not %d: not deleted (rename it checkpoint_%d.mdl "
                        "or move it out of the model_dir)", p, held, s, held)
            continue
        try:
            p.unlink(missing_ok=True)
            deleted.append(p)
        except OSError as e:  # the new checkpoint is safely written: not a reason to stop training
            log.warning("keep_checkpoints: cannot delete %s (%s)", p, e.strerror or e)
    return deleted


def peek(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The top-level entries ``keys`` of a checkpoint file, read without its tensors
    (memory-mapped); {} where it cannot be read that way (whoever loads it says why)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- unreadable here: the full load says why, later
        return {}
    return {k: state[k] for k in keys if k in state} if isinstance(state, dict) else {}



def check_model_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Raise if a checkpoint's tensors do not fit the model (names or shapes)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{path}: checkpoint is for another model ({'; '.join(parts)})")
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: checkpoint is for another model shape: {k} is {tuple(state[k].shape)}, "
                f"the model built from params has {tuple(t.shape)}"
            )
