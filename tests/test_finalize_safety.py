"""``finalize -o`` loses nothing (issue 17): it never replaces a file without ``--overwrite``, never
anything but a regular file, never writes a ``checkpoint_<N>.mdl`` into a model_dir (the next
resume would load it as the run's), writes atomically, and says in one line what is wrong with
an output path. ``inspect`` and ``--checkpoint_path`` read the ``.safetensors`` it writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sparsetrain import checkpoint as ckpt
from tests.e2e.helpers import error_line
from tests.helpers import cli, records

SPARSE = {"sparsity": 0.5, "param_name_patterns": [".*dense.*weight"], "init_method": "random"}


@pytest.fixture
def sparse_run(tmp_path, tiny_params, write_params):
    """(params file, model_dir) of a sparse run of 4 steps."""
    params = write_params(tiny_params(sparsity=SPARSE), "sparse.yaml")
    d = tmp_path / "run"
    assert cli("train", "--params", params, "--model_dir", d) == 0
    return params, d


def _finalize_error(capsys, *args) -> str:
    capsys.readouterr()
    assert cli("finalize", *map(str, args)) == 2
    return error_line(capsys, only=True)


def test_an_existing_output_needs_overwrite(sparse_run, tmp_path, capsys):
    _, d = sparse_run
    out = tmp_path / "dense.mdl"
    out.write_bytes(b"somebody's file")
    line = _finalize_error(capsys, "-i", d / "checkpoint_4.mdl", "-o", out)
    assert f"-o {out}: already exists; pass --overwrite" in line
    assert out.read_bytes() == b"somebody's file"
    assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", out, "--overwrite") == 0
    assert ckpt.load_checkpoint(out)["global_step"] == 4


def test_a_fifo_is_never_replaced_even_with_overwrite(sparse_run, tmp_path, capsys):
    _, d = sparse_run
    fifo = tmp_path / "pipe.mdl"
    os.mkfifo(fifo)
    line = _finalize_error(capsys, "-i", d / "checkpoint_4.mdl", "-o", fifo, "--overwrite")
    assert "is not a regular file" in line and "never replaces one" in line
    assert fifo.is_fifo()


def test_a_device_node_is_never_replaced(sparse_run, tmp_path, capsys):
    _, d = sparse_run
    link = tmp_path / "null.mdl"
    link.symlink_to("/dev/null")  # a device behind a link: what the link points at counts
    line = _finalize_error(capsys, "-i", d / "checkpoint_4.mdl", "-o", link, "--overwrite")
    assert "is not a regular file" in line
    assert link.is_symlink() and os.path.exists("/dev/null")


def test_a_checkpoint_name_in_a_model_dir_is_refused(sparse_run, capsys):
    _, d = sparse_run
    before = sorted(p.name for p in d.iterdir())
    line = _finalize_error(capsys, "-i", d / "checkpoint_4.mdl", "-o", d / "checkpoint_100.mdl", "--overwrite")
    assert "a checkpoint name in a model_dir" in line and "dense_100.mdl" in line
    assert sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize("case", ["missing dir", "a directory", "a directory named .safetensors", "other suffix"])
def test_bad_output_paths_are_one_line(sparse_run, tmp_path, capsys, case):
    _, d = sparse_run
    out, expect = {
        "missing dir": (tmp_path / "nope" / "dense.mdl", f"the directory {tmp_path / 'nope'} does not exist"),
        "a directory": (tmp_path, "is a directory; give a file path"),
        "a directory named .safetensors": (tmp_path / "x.safetensors", "is a directory; give a file path"),
        "other suffix": (tmp_path / "dense.pt", "choose a name ending in .mdl"),
    }[case]
    if case == "a directory named .safetensors":
        out.mkdir()
    line = _finalize_error(capsys, "-i", d / "checkpoint_4.mdl", "-o", out)
    assert line.startswith(f"error: -o {out}: ") and expect in line, line


def test_a_failed_write_leaves_the_old_output(sparse_run, tmp_path, capsys, monkeypatch):
    _, d = sparse_run
    out = tmp_path / "dense.safetensors"
    assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", out) == 0
    before = out.read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    line = _finalize_error(capsys, "-i", d / "checkpoint_4.mdl", "-o", out, "--overwrite")
    assert "disk full" in line
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_safetensors_output_follows_the_umask(sparse_run, tmp_path):
    _, d = sparse_run
    old = os.umask(0o027)
    try:
        assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", tmp_path / "dense.safetensors") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "dense.safetensors").stat().st_mode & 0o777 == 0o640


def test_inspect_reads_finalizes_safetensors(sparse_run, tmp_path, capsys):
    _, d = sparse_run
    out = tmp_path / "dense.safetensors"
    assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", out) == 0
    capsys.readouterr()
    assert cli("inspect", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["global_step"] == 4 and report["total"]["nan"] == 0 and report["tensors"]


def test_a_warm_start_from_finalizes_safetensors(sparse_run, tmp_path, tiny_params, write_params, capsys):
    _, d = sparse_run
    out = tmp_path / "dense.safetensors"
    assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", out) == 0
    dense = write_params(tiny_params(runconfig={"max_steps": 2}), "dense.yaml")
    fine = tmp_path / "fine"
    assert cli("train", "--params", dense, "--model_dir", fine, "--checkpoint_path", out) == 0
    assert [r["step"] for r in records(fine) if r["kind"] == "train"] == [1, 2]
    state = ckpt.load_checkpoint(fine / "checkpoint_2.mdl")
    assert state["warm_start_from"] == {"path": str(out.resolve()), "step": 4}


def test_a_safetensors_file_cannot_continue_a_run(sparse_run, tmp_path, tiny_params, write_params, capsys):
    params, d = sparse_run
    out = tmp_path / "dense.safetensors"
    assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", out) == 0
    fake = tmp_path / "other" / "checkpoint_4.mdl"
    fake.parent.mkdir()
    fake.write_bytes(out.read_bytes())  # renamed into a model_dir: looks like the run's checkpoint
    capsys.readouterr()
    assert cli("train", "--params", params, "--model_dir", fake.parent, "--set", "runconfig.max_steps=6") == 2
    line = error_line(capsys)
    assert "holds weights only (a .safetensors file)" in line and "warm start from it" in line
    # finalize's input: said what it is, not "corrupt"
    line = _finalize_error(capsys, "-i", out, "-o", tmp_path / "again.mdl")
    assert "a .safetensors file (weights only" in line and "corrupt" not in line


def test_a_truncated_safetensors_file_is_one_line(sparse_run, tmp_path, capsys):
    _, d = sparse_run
    out = tmp_path / "dense.safetensors"
    assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", out) == 0
    blob = out.read_bytes()
    header = 8 + int.from_bytes(blob[:8], "little")
    out.write_bytes(blob[: header + 10])  # header intact, tensors cut off
    capsys.readouterr()
    assert cli("inspect", out) == 2
    line = error_line(capsys, only=True)
    assert line.startswith(f"error: {out}: corrupt or truncated .safetensors file"), line


def test_finalize_beside_a_running_training_keeps_its_temporary_file(sparse_run, tmp_path):
    """The save that killed a training: finalize -o run/dense.mdl removed run/'s in-progress temp file."""
    import subprocess
    import sys

    _, d = sparse_run
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        temp = d / f".checkpoint_6.mdl.{ckpt._host()}.{writer.pid}.x1y2z3.tmp"
        temp.write_bytes(b"a save in progress")
        assert cli("finalize", "-i", d / "checkpoint_4.mdl", "-o", d / "dense.mdl") == 0
        assert temp.read_bytes() == b"a save in progress"
    finally:
        writer.kill()
        writer.wait()
    assert torch.load(d / "dense.mdl", weights_only=True)["global_step"] == 4
