"""The shipped configs: ``--params builtin:NAME`` and ``sparsetrain configs`` (list, show, copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsetrain.config import load_params
from sparsetrain.config.builtin import CONFIG_DIR, data_files, names
from sparsetrain.errors import ConfigError
from tests.helpers import ROOT, cli


def test_the_checkout_configs_are_the_shipped_ones():
    assert (ROOT / "configs").resolve() == CONFIG_DIR
    assert "gpt2_tiny_sparse" in names() and "gpt2_tiny_finetune_completions" in names()


def test_builtin_reads_the_shipped_file_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params("builtin:gpt2_tiny_sparse", ["runconfig.max_steps=5"])
    assert params.path == CONFIG_DIR / "gpt2_tiny_sparse.yaml" and params.runconfig.max_steps == 5
    assert load_params("builtin:gpt2_tiny_sparse.yaml").path == params.path


@pytest.mark.parametrize("spec, hint", [("builtin:gpt2_tiny_spars", "did you mean 'gpt2_tiny_sparse'?"),
                                        ("builtin:../pyproject", "valid names"), ("builtin:", "valid names")])
def test_an_unknown_name_is_one_line(spec, hint):
    with pytest.raises(ConfigError) as e:
        load_params(spec)
    assert str(e.value).startswith(f"{spec}: no shipped config of that name") and hint in str(e.value)
    assert "`sparsetrain configs` lists them" in str(e.value)


def test_list_show_and_copy(tmp_path, capsys):
    assert cli("configs") == 0
    listing = capsys.readouterr().out
    assert any(line.split()[:4] == ["gpt2_tiny_sparse", "The", "README's", "demo:"] for line in listing.splitlines())
    assert all(name in listing for name in names())
    assert cli("configs", "gpt2_tiny") == 0
    assert capsys.readouterr().out == (CONFIG_DIR / "gpt2_tiny.yaml").read_text()
    assert cli("configs", "gpt2_tiny_finetune_completions", "gpt2_tiny", "--copy", tmp_path / "mine") == 0
    assert sorted(str(p.relative_to(tmp_path / "mine")) for p in (tmp_path / "mine").rglob("*") if p.is_file()) == [
        "data/tiny_completions.jsonl", "gpt2_tiny.yaml", "gpt2_tiny_finetune_completions.yaml"]
    assert data_files(CONFIG_DIR / "gpt2_tiny_finetune_completions.yaml") == [Path("data/tiny_completions.jsonl")]


def test_copy_never_replaces_without_overwrite(tmp_path, capsys):
    (tmp_path / "gpt2_tiny.yaml").write_text("mine\n")
    assert cli("configs", "gpt2_tiny", "gpt2_tiny_sparse", "--copy", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --copy {tmp_path}: {tmp_path / 'gpt2_tiny.yaml'} exists; pass --overwrite to "
                           "replace, or choose another directory")
    assert (tmp_path / "gpt2_tiny.yaml").read_text() == "mine\n" and not (tmp_path / "gpt2_tiny_sparse.yaml").exists()
    assert cli("configs", "gpt2_tiny", "--copy", tmp_path, "--overwrite") == 0
    assert (tmp_path / "gpt2_tiny.yaml").read_text() == (CONFIG_DIR / "gpt2_tiny.yaml").read_text()
    (tmp_path / "file").write_text("")
    assert cli("configs", "gpt2_tiny", "--copy", tmp_path / "file") == 2
    assert "not a directory" in capsys.readouterr().err
