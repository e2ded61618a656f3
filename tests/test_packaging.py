"""The package as a user installs it (issue 18, "a package that installs whole"): one version,
``sparsetrain --version``, an SPDX license with its LICENSE file, and ``py.typed``."""

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
                ["plan"], ["inspect"], ["finalize"], ["bench"], ["bench", "train"], ["bench", "layer"]]
    for command in commands:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        text = capsys.readouterr().out
        assert "example:\n  sparsetrain " + " ".join(command) in text, command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 200)" in text and "(default: 0.8)" in text and "seed of the sampling (default: 0)" in text
