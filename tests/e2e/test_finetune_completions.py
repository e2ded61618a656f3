"""Fine-tuning on prompt/completion data end to end through the command line: the shipped example
(``builtin:gpt2_tiny_finetune_completions``) runs from a directory that does not hold its data,
its completion loss falls, and evaluation says what its loss counts (``eval_loss_tokens``): the
completion tokens of a prompt/completion file, the kept positions of an HDF5 sample's loss mask,
every token of plain text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from sparsetrain.config.builtin import CONFIG_DIR
from sparsetrain.data import completions
from tests.data.helpers import make_input
from tests.helpers import cli, records

EXAMPLE = "builtin:gpt2_tiny_finetune_completions"
FAST = ["--set", "runconfig.progress=false"]


def _sets(*pairs: str) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


def test_example_fine_tunes_from_any_directory(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # no data/ here: the data is found beside the shipped params file
    run = tmp_path / "run"
    rc = cli("train_and_eval", "--params", EXAMPLE, "--model_dir", run, *FAST,
             *_sets("runconfig.max_steps=40", "runconfig.eval_frequency=20", "runconfig.log_steps=10",
                    "train_input.batch_size=8", "train_input.max_sequence_length=128", "eval_input.max_sequence_length=128"))
    assert rc == 0
    first, last = records(run, "eval")
    assert first["eval_loss_tokens"] == last["eval_loss_tokens"] == "completion"
    params = yaml.safe_load((CONFIG_DIR / "gpt2_tiny_finetune_completions.yaml").read_text())
    section = params["eval_input"]
    evals = completions.records(_section(section, CONFIG_DIR / section["data_path"]))
    assert last["eval_tokens"] == sum(len(r.completion.encode()) + 1 for r in evals)  # with its eos; batch_size 1
    assert last["eval_loss"] < first["eval_loss"] < 5.0  # from ln(256) = 5.55
    assert "completion loss" in (run / "train.log").read_text()
    written = yaml.safe_load((run / "params.yaml").read_text())
    assert written["train_input"]["data_path"] == str(CONFIG_DIR / "data" / "tiny_completions.jsonl")


def _section(raw: dict, path: Path):
    keys = ("source", "prompt_field", "completion_field", "eval_fraction", "max_sequence_length")
    return make_input(**{k: raw[k] for k in keys}, data_path=str(path), split="eval", section="eval_input")


def _hdf5_params(tmp_path: Path, mask: np.ndarray) -> Path:
    """A tiny run on 8 zoo samples of 16 tokens whose loss mask is ``mask`` (8, 16)."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, size=(8, 17))
    sample = np.stack([ids[:, :-1], mask, ids[:, 1:]], axis=1).astype(np.int32)
    d = tmp_path / "h5"
    d.mkdir()
    with h5py.File(d / "data_0.h5", "w") as f:
        f.create_dataset("data", data=sample)
    section = {"source": "hdf5", "data_dir": str(d), "batch_size": 4, "max_sequence_length": None}
    params = {
        "train_input": section, "eval_input": section,
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "max_position_embeddings": 32},
        "runconfig": {"max_steps": 2, "log_steps": 1, "seed": 0, "progress": False},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("masked", [True, False], ids=["mask-with-zeros", "mask-all-ones"])
def test_hdf5_samples_report_what_the_loss_counts(tmp_path, masked, one_thread):
    mask = np.ones((8, 16), np.int32)
    if masked:
        mask[:, :10] = 0  # a prompt of 10 positions, as a fine-tuning HDF5 file holds
    assert cli("train", "--params", _hdf5_params(tmp_path, mask), "--model_dir", tmp_path / "run") == 0
    (ev,) = records(tmp_path / "run", "eval")
    assert ev["eval_tokens"] == int(mask.sum())  # every sample: 2 full batches of 4
    assert ev["eval_loss_tokens"] == ("completion" if masked else "all")


def test_plain_text_counts_every_token(tmp_path, tiny_params, write_params, one_thread):
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", tmp_path / "run") == 0
    (ev,) = records(tmp_path / "run", "eval")
    assert ev["eval_loss_tokens"] == "all" and ev["eval_tokens"] == 2 * 4 * 32  # eval_steps 2 of 4 x 32
