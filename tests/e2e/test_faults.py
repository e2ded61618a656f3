"""Failure behaviour (issue #7): nothing lost, nothing confusing.

- kill -9 at random points of a CPU training run (mid-save included), then resume: every
  checkpoint stays loadable and the resumed run ends with exactly the weights and logged losses
  of an uninterrupted run;
- disk full / permission denied during a save: one ``error:`` line naming the path and the
  reason, exit 2, the previous checkpoint intact, no partial file;
- corrupt, truncated, foreign, other-shape and pickled-code checkpoints: one line naming the
  file, exit 2, pickled code never runs;
- bad data (empty corpus, ids beyond the vocab, too-short shards, unreadable files): one line
  naming the key, exit 2, before any checkpoint or metrics file exists.

SIGINT / SIGTERM and non-finite losses are in ``test_faults_training.py``; the saves that fail
inside ``checkpoint.py`` itself (a real ENOSPC, an exit mid-write) in ``tests/test_checkpoint.py``.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain import data
from sparsetrain.config import params_from_dict
from sparsetrain.training.model_dir import LOCK_NAME
from tests.e2e.helpers import TEMP_RE, error_line
from tests.helpers import ROOT, FailingFile, cli, tiny_gpt

RUN_PY = ROOT / "run.py"


def check_model_dir(model_dir: Path) -> list[int]:
    """Every checkpoint loads and holds its step; nothing else carries a checkpoint's name.

    Returns the checkpoint steps, oldest first."""
    steps = []
    for p in sorted(model_dir.glob("checkpoint_*")):
        m = ckpt.CHECKPOINT_RE.match(p.name)
        assert m, f"{p.name} looks like a checkpoint but is not one"
        state = ckpt.load_checkpoint(p)
        assert state["global_step"] == int(m.group(1)), p
        steps.append(int(m.group(1)))
    for name in os.listdir(model_dir):
        if "checkpoint" in name and not ckpt.CHECKPOINT_RE.match(name):
            assert TEMP_RE.match(name), f"{name}: a leftover that is neither a checkpoint nor a hidden temporary file"
    metrics = model_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            json.loads(line)  # no torn records
    return sorted(steps)


def temp_files(model_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(model_dir) if TEMP_RE.match(n))


def train_records(model_dir: Path) -> list[tuple[int, float, float]]:
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(v, sb[i][k]), (i, k)
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


# ---------------------------------------------------------------------------------------------
# kill -9 at random points, then resume
# ---------------------------------------------------------------------------------------------

# Runs inside the training process: dies by SIGKILL at a chosen point of one checkpoint save,
# exactly as a machine that loses power there. ``mid-write``: after writing half of the
# checkpoint's bytes into the temporary file; ``before-rename``: after the whole temporary
# file is written and flushed, just before its rename.
DIE_PY = r'''
import io, os, runpy, signal, sys
mode, step = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]
import torch

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "mid-write":
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == step:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            die()
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif mode == "before-rename":
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == f"checkpoint_{step}.mdl":
            die()
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
runpy.run_path(sys.argv[0], run_name="__main__")
'''

KILL_STEPS = 40


@pytest.fixture
def kill_setup(tmp_path, tiny_params, write_params):
    # vocab 4096: checkpoints of ~2 MB, so a save takes long enough to be caught mid-write
    p = tiny_params(
        model={"dropout_rate": 0.1, "vocab_size": 4096},
        runconfig={"max_steps": KILL_STEPS, "checkpoint_steps": 5, "log_steps": 1, "eval_steps": 1},
    )
    die = tmp_path / "die.py"
    die.write_text(DIE_PY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("PYTHONPATH", None)  # run.py finds the package itself
    return write_params(p), die, env


def _start(params: Path, model_dir: Path, env: dict, log: Path, die: tuple[Path, str, int] | None = None):
    cmd = [str(RUN_PY), "--mode", "train", "--params", str(params), "--model_dir", str(model_dir)]
    if die is not None:
        script, mode, step = die
        cmd = [str(script), mode, str(step), *cmd]
    out = open(log, "ab")  # the caller closes it
    return subprocess.Popen([sys.executable, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT), out


def _logged_steps(metrics: Path, offset: int) -> int:
    try:
        with open(metrics, "rb") as f:
            f.seek(offset)
            tail = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return -1
    steps = [int(m) for m in re.findall(r'"kind": "train", "step": (\d+)', tail)]
    return max(steps, default=-1)


def _run_and_kill(proc, model_dir: Path, trigger: tuple[str, float], timeout: float = 120.0) -> bool:
    """Poll until ``trigger`` fires, then SIGKILL; False if the run ended on its own first.

    ``("delay", s)``: s seconds after the start. ``("temp", n)``: as soon as this run has created
    the temporary file of a checkpoint for step >= n (mid-save), or, should every save slip
    between two polls, once step n + 8 is logged. ``("step", n)``: once step n is logged.
    """
    kind, value = trigger
    metrics = model_dir / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.exists() else 0
    old = set(os.listdir(model_dir)) if model_dir.exists() else set()
    start = time.monotonic()
    while proc.poll() is None:
        now = time.monotonic() - start
        assert now < timeout, f"no {trigger} within {timeout} s"
        if kind == "delay" and now >= value:
            break
        if kind == "temp":
            try:
                names = set(os.listdir(model_dir)) - old
            except FileNotFoundError:
                names = set()
            if any((m := TEMP_RE.match(n)) and int(m.group(1)) >= value for n in names):
                break
            if _logged_steps(metrics, offset) >= value + 8:
                break
        if kind == "step" and _logged_steps(metrics, offset) >= value:
            break
        time.sleep(0.0005)
    else:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_kill9_at_random_points_then_resume_matches_uninterrupted_run(tmp_path, kill_setup):
    params, die, env = kill_setup
    rng = random.Random(20261128)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref, ref_out = _start(params, ref_dir, env, tmp_path / "ref.log")  # runs alongside the killed ones

    def log_text() -> str:
        return (tmp_path / "run.log").read_text(errors="replace")[-3000:]

    # 1. death in the middle of writing checkpoint 10: half of its bytes are in the temp file
    proc, out = _start(params, run_dir, env, tmp_path / "run.log", die=(die, "mid-write", 10))
    assert proc.wait(timeout=120) == -signal.SIGKILL, log_text()
    out.close()
    assert check_model_dir(run_dir) == [5]
    (partial,) = temp_files(run_dir)
    assert 0 < (run_dir / partial).stat().st_size < (run_dir / "checkpoint_5.mdl").stat().st_size
    assert ckpt.latest_checkpoint(run_dir).name == "checkpoint_5.mdl"

    # 2. death between the complete temporary file and its rename, at checkpoint 20
    proc, out = _start(params, run_dir, env, tmp_path / "run.log", die=(die, "before-rename", 20))
    assert proc.wait(timeout=120) == -signal.SIGKILL, log_text()
    out.close()
    assert check_model_dir(run_dir) == [5, 10, 15]
    assert [n for n in temp_files(run_dir) if ".checkpoint_20.mdl." in n], "the unrenamed temp file of step 20"
    assert partial not in temp_files(run_dir), "a stale temp file of a dead run is removed by the next save"

    # 3-5. kill -9 from outside: at a random time (most likely still starting up), as soon as a
    # save has begun, after a random step between two checkpoints
    steps_before = check_model_dir(run_dir)
    for trigger in [("delay", rng.uniform(0.3, 1.5)), ("temp", 25), ("step", None)]:
        if trigger[0] == "step":
            trigger = ("step", min(max(steps_before) + rng.randint(1, 4), KILL_STEPS - 3))
            if trigger[1] <= max(steps_before):
                continue
        proc, out = _start(params, run_dir, env, tmp_path / "run.log")
        killed = _run_and_kill(proc, run_dir, trigger)
        out.close()
        assert killed, f"the run finished before {trigger}: {log_text()}"
        steps = check_model_dir(run_dir)
        assert steps[: len(steps_before)] == steps_before, "an earlier checkpoint disappeared"
        steps_before = steps

    # 6. the same command again runs to the end
    proc, out = _start(params, run_dir, env, tmp_path / "run.log")
    assert proc.wait(timeout=120) == 0, log_text()
    out.close()
    assert ref.wait(timeout=120) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref_out.close()

    assert check_model_dir(run_dir)[-1] == KILL_STEPS
    assert temp_files(run_dir) == [], "temporary files of killed runs are cleaned up"
    final = ckpt.load_checkpoint(run_dir / f"checkpoint_{KILL_STEPS}.mdl")
    assert_same_state(final, ckpt.load_checkpoint(ref_dir / f"checkpoint_{KILL_STEPS}.mdl"))

    # Logged losses: every step the uninterrupted run logged, with the same loss and lr; steps a
    # killed run logged after its last checkpoint were logged again on resume, identically.
    expected = {step: (loss, lr) for step, loss, lr in train_records(ref_dir)}
    got: dict[int, set] = {}
    for step, loss, lr in train_records(run_dir):
        got.setdefault(step, set()).add((loss, lr))
    assert sorted(got) == sorted(expected) == list(range(1, KILL_STEPS + 1))
    for step, values in got.items():
        assert values == {expected[step]}, (step, values, expected[step])


# ---------------------------------------------------------------------------------------------
# disk full / permission denied during a save
# ---------------------------------------------------------------------------------------------


def _fail_on_second_save(monkeypatch, how: str) -> dict:
    """Make the second checkpoint save of the run (step 10) fail as ``how`` says."""
    seen = {"saves": 0, "before": None}
    real_mkstemp, real_fdopen, real_fsync, real_replace = ckpt.tempfile.mkstemp, os.fdopen, os.fsync, os.replace

    def failing() -> bool:
        return seen["saves"] == 2

    def mkstemp(*args, **kwargs):
        seen["saves"] += 1
        if failing():
            first = Path(kwargs["dir"]) / "checkpoint_5.mdl"
            seen["before"] = first.read_bytes()
            if how == "eacces-create":
                raise PermissionError(errno.EACCES, "Permission denied", str(kwargs["dir"]))
        return real_mkstemp(*args, **kwargs)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if failing() and how == "enospc-write":
            return FailingFile(f, OSError(errno.ENOSPC, "No space left on device"))
        return f

    def fsync(fd):
        if failing() and how == "enospc-fsync":  # delayed allocation: the error shows at fsync
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        if failing() and how == "eacces-rename" and Path(dst).name.startswith("checkpoint_"):
            raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


@pytest.mark.parametrize(
    "how, reason",
    [
        ("enospc-write", "disk full"),
        ("enospc-fsync", "disk full"),
        ("eacces-create", "permission denied"),
        ("eacces-rename", "permission denied"),
    ],
)
def test_disk_full_or_unwritable_during_save(how, reason, tmp_path, tiny_params, write_params, capsys, monkeypatch, one_thread):
    params = write_params(tiny_params(runconfig={"max_steps": 12, "checkpoint_steps": 5}))
    d = tmp_path / "run"
    seen = _fail_on_second_save(monkeypatch, how)
    assert cli("train", "--params", params, "--model_dir", d) == 2
    line = error_line(capsys)
    assert str(d / "checkpoint_10.mdl") in line and "cannot write checkpoint" in line and reason in line, line
    assert seen["saves"] == 2
    monkeypatch.undo()
    # the previous checkpoint is intact, byte for byte; no partial file anywhere
    assert check_model_dir(d) == [5]
    assert (d / "checkpoint_5.mdl").read_bytes() == seen["before"]
    assert [n for n in os.listdir(d) if n.startswith(".") and n != LOCK_NAME] == []  # the lock stays, by design
    # and once there is room again, the same command resumes from it and finishes
    assert cli("train", "--params", params, "--model_dir", d) == 0
    assert check_model_dir(d) == [5, 10, 12]


def test_unwritable_model_dir_is_one_line(tmp_path, tiny_params, write_params, capsys, monkeypatch):
    """An unwritable model_dir (simulated: tests run as root) is reported before anything runs."""
    params = write_params(tiny_params())
    d = tmp_path / "run"
    d.mkdir()
    real_open = Path.open

    def deny(self, *args, **kwargs):
        if self.parent == d:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    assert cli("train", "--params", params, "--model_dir", d) == 2
    line = error_line(capsys, only=True)
    assert f"--model_dir {d}: cannot write there" in line and "Permission denied" in line
    assert os.listdir(d) == []


# ---------------------------------------------------------------------------------------------
# corrupt, truncated, foreign, other-shape and pickled-code checkpoints
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: proof that pickled code ran."""

    marker = ""

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _tiny_state(hidden: int = 32) -> dict:
    model = tiny_gpt(seed=None, hidden_size=hidden, max_position_embeddings=64, vocab_size=256)
    return {"model": model.state_dict(), "global_step": 4, "optimizer": {}, "params": {}}


def _zip_not_torch(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")


def _truncated(p: Path) -> None:
    ckpt.save_checkpoint(_tiny_state(), p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3])


BAD_CHECKPOINTS = {
    "empty": (lambda p, m: p.write_bytes(b""), "corrupt or truncated"),
    "garbage": (lambda p, m: p.write_bytes(os.urandom(3000)), "corrupt or truncated"),
    "truncated": (lambda p, m: _truncated(p), "corrupt or truncated"),
    "zip-not-torch": (lambda p, m: _zip_not_torch(p), "corrupt or truncated"),
    "foreign-dict": (lambda p, m: torch.save({"weights": torch.ones(2)}, p), "not a sparsetrain checkpoint"),
    "foreign-list": (lambda p, m: torch.save([torch.ones(2)], p), "not a sparsetrain checkpoint"),
    "model-not-tensors": (lambda p, m: torch.save({"model": {"w": 1}, "global_step": 1}, p), "not a sparsetrain checkpoint"),
    "step-not-int": (lambda p, m: torch.save({**_tiny_state(), "global_step": "four"}, p), "not a sparsetrain checkpoint"),
    "optimizer-not-dict": (lambda p, m: torch.save({**_tiny_state(), "optimizer": [1, 2]}, p), "not a sparsetrain checkpoint"),
    "rng-not-state": (lambda p, m: torch.save({**_tiny_state(), "rng": {"torch": torch.ones(3)}}, p), "not a sparsetrain checkpoint"),
    "other-shape": (lambda p, m: torch.save(_tiny_state(hidden=64), p), "checkpoint is for another model shape"),
    "other-model": (lambda p, m: torch.save({"model": {"fc.weight": torch.ones(2, 2)}, "global_step": 1}, p),
                    "checkpoint is for another model"),
    "pickle-code": (lambda p, m: p.write_bytes(pickle.dumps({"model": _Payload(), "global_step": 1})), "corrupt or truncated"),
    "torch-code": (lambda p, m: torch.save({**_tiny_state(), "evil": _Payload()}, p), "refused to load"),
    "legacy-torch-code": (lambda p, m: torch.save({"model": _Payload(), "global_step": 1}, p,
                                                  _use_new_zipfile_serialization=False), "corrupt or truncated"),
    "directory": (lambda p, m: p.mkdir(), "is a directory"),
}


def _make_bad(tmp_path: Path, kind: str, name: str = "checkpoint_7.mdl") -> tuple[Path, Path, str]:
    marker = tmp_path / f"PWNED_{kind}"
    _Payload.marker = str(marker)
    path = tmp_path / "elsewhere" / name
    path.parent.mkdir(exist_ok=True)
    make, message = BAD_CHECKPOINTS[kind]
    make(path, marker)
    assert not marker.exists()
    return path, marker, message


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_naming_the_file(kind, tmp_path, tiny_params, write_params, capsys, one_thread):
    path, marker, message = _make_bad(tmp_path, kind)
    shape_only = kind in ("other-shape", "other-model")  # a fine checkpoint, for another model: inspect reads it

    # inspect: nothing but the error line
    rc = cli("inspect", path)
    if shape_only:
        assert rc == 0
        capsys.readouterr()
    else:
        assert rc == 2
        line = error_line(capsys, only=True)
        assert line.startswith(f"error: {path}: ") and message in line, line
    # finalize writes nothing
    out = tmp_path / "dense.mdl"
    assert cli("finalize", "-i", path, "-o", out) == (0 if shape_only else 2)
    capsys.readouterr()
    assert out.exists() == shape_only
    # train --checkpoint_path (a warm start from a file outside model_dir)
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d, "--checkpoint_path", path) == 2
    line = error_line(capsys)
    # a directory is what --checkpoint_path names for a Hugging Face model: the flag is named
    where = f"--checkpoint_path {path}" if kind == "directory" else str(path)
    assert line.startswith(f"error: {where}: ") and message in line, line
    assert not list(d.glob("checkpoint_*")) and not (d / "metrics.jsonl").exists()
    assert not marker.exists(), "pickled code ran"


def test_bad_newest_checkpoint_in_model_dir_on_resume(tmp_path, tiny_params, write_params, capsys, one_thread):
    params = write_params(tiny_params())
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    before = (d / "checkpoint_4.mdl").read_bytes()
    for kind in ("truncated", "torch-code"):
        path, marker, message = _make_bad(tmp_path, kind, name=f"{kind}.mdl")
        path.rename(d / "checkpoint_9.mdl")
        capsys.readouterr()
        assert cli("train", "--params", params, "--model_dir", d, "--set", "runconfig.max_steps=12") == 2
        line = error_line(capsys)
        assert line.startswith(f"error: {d / 'checkpoint_9.mdl'}: ") and message in line, line
        assert not marker.exists()
        assert (d / "checkpoint_4.mdl").read_bytes() == before  # nothing saved was touched
        assert sorted(p.name for p in d.glob("checkpoint_*")) == ["checkpoint_4.mdl", "checkpoint_9.mdl"]


# ---------------------------------------------------------------------------------------------
# bad data: reported before training starts
# ---------------------------------------------------------------------------------------------


def _shards(tmp_path: Path, tiny_params, corpus_dir: Path | None = None) -> Path:
    p = params_from_dict(tiny_params(train_input={"split": "all", **({"data_path": str(corpus_dir)} if corpus_dir else {})}))
    out = tmp_path / "shards"
    data.prepare_shards(p.train_input, out, "byte", 4096)
    return out


def _shard_params(tiny_params, shards: Path) -> dict:
    src = {"source": "shards", "data_path": str(shards), "tokenizer": "byte"}
    return tiny_params(train_input={**src, "split": "train"}, eval_input={**src, "split": "eval"})


def _bad_empty_dir(tmp_path, tiny_params, monkeypatch):
    (tmp_path / "empty").mkdir()
    return tiny_params(train_input={"data_path": str(tmp_path / "empty")}), "train_input.data_path", "holds no files"


def _bad_empty_file(tmp_path, tiny_params, monkeypatch):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "empty.txt").write_text("")
    return tiny_params(train_input={"data_path": str(tmp_path / "blank")}), "train_input.data_path", "holds no text"


def _bad_token_ids(tmp_path, tiny_params, monkeypatch):
    shards = _shards(tmp_path, tiny_params)
    tokens = np.fromfile(shards / "train_000.bin", dtype=np.uint16)
    tokens[len(tokens) // 2] = 300  # beyond the byte vocabulary (256)
    tokens.tofile(shards / "train_000.bin")
    return _shard_params(tiny_params, shards), "train_input", "token id 300 does not fit model.vocab_size 256"


def _bad_short_shard(tmp_path, tiny_params, monkeypatch):
    small = tmp_path / "small"
    small.mkdir()
    (small / "one.txt").write_text("def f():\n    return 1\n")  # 24 bytes < one sequence of 33
    return _shard_params(tiny_params, _shards(tmp_path, tiny_params, small)), "train_input.max_sequence_length", "fewer than one sequence"


def _bad_truncated_shard(tmp_path, tiny_params, monkeypatch):
    shards = _shards(tmp_path, tiny_params)
    raw = (shards / "train_000.bin").read_bytes()
    (shards / "train_000.bin").write_bytes(raw[: len(raw) // 2])
    return _shard_params(tiny_params, shards), "train_input.data_path", "truncated?"


def _deny_open(monkeypatch, target: Path) -> None:
    """Simulate a file that cannot be read (the tests run as root, so chmod would not do)."""
    real_open, real_io_open = builtins.open, io.open

    def guarded(opener):
        def open_(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file) == target:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return opener(file, *args, **kwargs)
        return open_

    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(io, "open", guarded(real_io_open))


def _bad_unreadable_file(tmp_path, tiny_params, monkeypatch):
    p = tiny_params()
    target = Path(p["train_input"]["data_path"]) / "doc_007.txt"
    _deny_open(monkeypatch, target)
    return p, "train_input.data_path", f"cannot read {str(target)!r}: Permission denied"


def _bad_unreadable_shard(tmp_path, tiny_params, monkeypatch):
    shards = _shards(tmp_path, tiny_params)
    _deny_open(monkeypatch, shards / "train_000.bin")
    return _shard_params(tiny_params, shards), "train_input.data_path", "cannot be read (Permission denied)"


def _bad_fifo(tmp_path, tiny_params, monkeypatch):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)  # opening it for reading would block forever
    return tiny_params(train_input={"data_path": str(fifo)}), "train_input.data_path", "is not a regular file or a directory"


def _bad_eval_too_short(tmp_path, tiny_params, monkeypatch):
    one = tmp_path / "one.txt"
    one.write_text("x = 1\n" * 100)  # one file, split inside itself: the eval 5% is 30 bytes
    p = tiny_params(train_input={"data_path": str(one)}, eval_input={"data_path": str(one)})
    return p, "eval_input.max_sequence_length", "fewer than one sequence"


BAD_DATA = {
    "empty-corpus-dir": _bad_empty_dir,
    "only-an-empty-file": _bad_empty_file,
    "token-ids-beyond-vocab": _bad_token_ids,
    "shard-shorter-than-a-sequence": _bad_short_shard,
    "truncated-shard": _bad_truncated_shard,
    "unreadable-file": _bad_unreadable_file,
    "unreadable-shard": _bad_unreadable_shard,
    "fifo-as-data-path": _bad_fifo,
    "eval-split-shorter-than-a-sequence": _bad_eval_too_short,
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_data_is_reported_before_training(kind, tmp_path, tiny_params, write_params, capsys, monkeypatch, one_thread):
    raw, key, fragment = BAD_DATA[kind](tmp_path, tiny_params, monkeypatch)
    d = tmp_path / "run"
    assert cli("train", "--params", write_params(raw), "--model_dir", d) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {key}") and fragment in line, line
    monkeypatch.undo()
    assert not list(d.glob("checkpoint_*")), "a checkpoint was written"
    assert not (d / "metrics.jsonl").exists() and not list(d.glob("events.out.tfevents.*")), "training started"
