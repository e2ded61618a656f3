"""The package as a user installs it (issue 18, "a package that installs whole"): one version,
``sparsetrain --version``, an SPDX license with its LICENSE file, ``py.typed``, project URLs, and a
wheel that carries the shipped configs, so ``--params builtin:NAME`` works outside a checkout."""

from __future__ import annotations

import subprocess
import sys

import tomllib

import sparsetrain
from tests.helpers import ROOT


def test_the_version_lives_in_one_place():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sparsetrain.__version__"}
    from importlib.metadata import version

    assert version("sparsetrain") == sparsetrain.__version__  # the installed metadata agrees


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "--version"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src")}, check=True)
    assert out.stdout.strip() == f"sparsetrain {sparsetrain.__version__}"


def test_license_and_typing_marker():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "src" / "sparsetrain" / "py.typed").exists()
    assert "Typing :: Typed" in meta["classifiers"]


def test_every_subcommand_help_shows_defaults_and_an_example(capsys):
    import pytest

    from sparsetrain.cli_args import build_parser

    commands = [["train"], ["eval"], ["train_and_eval"], ["eval_all"], ["generate"], ["prepare"], ["convert-params"],
                ["plan"], ["inspect"], ["finalize"], ["export"], ["compare"], ["configs"], ["bench"], ["bench", "train"], ["bench", "layer"]]
    for command in commands:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        text = capsys.readouterr().out
        assert "example:\n  sparsetrain " + " ".join(command) in text, command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 200)" in text and "(default: 0.8)" in text and "seed of the sampling (default: 0)" in text


def test_project_urls():
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert urls and all(u.startswith("https://") for u in urls.values())


def test_the_wheel_carries_the_configs_and_runs_outside_a_checkout(tmp_path):
    """Build the wheel as pip would, unpack it (what an install puts in site-packages) and run the
    commands from a directory that is no checkout, with only the unpacked wheel on the path."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("sparsetrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (ROOT / "src" / "sparsetrain" / "configs").glob("*.yaml"))
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("sparsetrain/configs/") and n.endswith(".yaml")) == shipped
    assert "sparsetrain/py.typed" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "sparsetrain.cli", *args], cwd=elsewhere, capture_output=True,
                             text=True, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        return out.stdout

    listing = run("configs")
    assert all(name.removesuffix(".yaml") in listing for name in shipped)
    assert "pruned" in run("plan", "--params", "builtin:gpt2_tiny_sparse")
    run("configs", "gpt2_tiny_sparse", "--copy", "mine")
    assert (elsewhere / "mine" / "gpt2_tiny_sparse.yaml").read_text() == (ROOT / "configs" / "gpt2_tiny_sparse.yaml").read_text()
