"""``checkpoint.py``: save / list / prune / load of checkpoint files, atomic saves (a failed
write, a full disk, an exit signal mid-write leave the previous checkpoint and no partial file),
and bad files refused in one line naming the file."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain.errors import CheckpointError
from tests.helpers import FailingFile


def state(step=1):
    return {"model": {"w": torch.ones(3)}, "optimizer": {}, "global_step": step, "params": {"a": None}}


def test_save_load_list_prune(tmp_path):
    for s in (10, 2, 30):
        ckpt.save_checkpoint(state(s), ckpt.checkpoint_path(tmp_path, s))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 10, 30]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_30.mdl"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["global_step"] == 30
    ckpt.prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 30]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    ckpt.save_checkpoint(state(1), ckpt.checkpoint_path(tmp_path, 1))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(state(2), ckpt.checkpoint_path(tmp_path, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1.mdl"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "corrupt or truncated"),
        (lambda p: p.write_bytes(b"garbage" * 10), "corrupt or truncated"),
        (lambda p: torch.save({"x": 1}, p), "not a sparsetrain checkpoint"),
        (lambda p: p.write_bytes(pickle.dumps({"model": Evil(), "global_step": 1})), "checkpoint_9.mdl"),
        (lambda p: torch.save({"model": {}, "global_step": 1, "evil": Evil()}, p), "refused to load"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, make, message):
    path = tmp_path / "checkpoint_9.mdl"
    make(path)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_1.mdl"
    ckpt.save_checkpoint(state(1), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(path)


def test_shape_mismatch_names_tensor(tmp_path):
    with pytest.raises(CheckpointError, match=r"w is \(3,\), the model built from params has \(4,\)"):
        ckpt.check_model_state({"w": torch.ones(3)}, {"w": torch.ones(4)}, tmp_path / "c.mdl")
    with pytest.raises(CheckpointError, match="missing v"):
        ckpt.check_model_state({"w": torch.ones(3)}, {"w": torch.ones(3), "v": torch.ones(1)}, tmp_path / "c.mdl")


def test_on_cpu_keeps_cpu_tensors_and_structure():
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    w = torch.ones(2)
    s = {"model": {"w": w, "tied": w}, "opt": [(w, 1.0)], "p": Pair(w, "x"), "n": None}
    out = ckpt.on_cpu(s)
    assert out["model"]["w"] is w and out["model"]["tied"] is w  # nothing copied on the CPU
    assert out["opt"] == [(w, 1.0)] and isinstance(out["opt"][0], tuple)
    assert isinstance(out["p"], Pair) and out["p"].a is w and out["p"].b == "x" and out["n"] is None


@pytest.mark.cuda
def test_checkpoint_from_the_gpu_loads_without_one(tmp_path):
    """A plain torch.load (no map_location) gets CPU tensors; tied tensors stay one storage."""
    w = torch.randn(4, 3, device="cuda")
    s = {"model": {"embed": w, "head": w, "b": torch.zeros(3, device="cuda")}, "rng": {"cuda": torch.zeros(2, dtype=torch.uint8)}}
    path = tmp_path / "c.mdl"
    ckpt.save_checkpoint(s, path)
    back = torch.load(path, weights_only=True)
    assert all(t.device.type == "cpu" for t in back["model"].values())
    assert back["model"]["embed"].untyped_storage().data_ptr() == back["model"]["head"].untyped_storage().data_ptr()
    torch.testing.assert_close(back["model"]["embed"], w.cpu())
    assert s["model"]["embed"].is_cuda  # the caller's state is untouched


def test_real_enospc_from_dev_full_is_reported(tmp_path, monkeypatch):
    """The kernel's own ENOSPC (writing to /dev/full) reaches torch.save as a RuntimeError: still 'disk full'."""
    if not Path("/dev/full").exists():  # not Linux: the fake-writer cases above cover it
        return
    path = tmp_path / "checkpoint_3.mdl"
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        real_fdopen(fd, *args, **kwargs).close()
        return open("/dev/full", "wb")

    monkeypatch.setattr(os, "fdopen", fdopen)
    state = {"model": {"w": torch.randn(100_000)}, "global_step": 3}
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.save_checkpoint(state, path)
    assert str(e.value).startswith(f"{path}: cannot write checkpoint: disk full (ENOSPC)")
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [SystemExit(143), KeyboardInterrupt()], ids=["SystemExit", "KeyboardInterrupt"])
def test_signal_exit_inside_a_save_stays_an_exit(exc, tmp_path, monkeypatch):
    """A signal handler that raises while torch.save is writing: torch reports a RuntimeError
    ("unexpected pos"); the save removes its temporary file and lets the exit through."""
    ckpt.save_checkpoint({"model": {"w": torch.ones(3)}, "global_step": 1}, tmp_path / "checkpoint_1.mdl")
    before = (tmp_path / "checkpoint_1.mdl").read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FailingFile(real_fdopen(fd, *a, **k), exc, after=100))
    with pytest.raises(type(exc)):
        ckpt.save_checkpoint({"model": {"w": torch.randn(100_000)}, "global_step": 2}, tmp_path / "checkpoint_2.mdl")
    assert os.listdir(tmp_path) == ["checkpoint_1.mdl"]
    assert (tmp_path / "checkpoint_1.mdl").read_bytes() == before
