"""``config/params.py``: the params file read and validated (every shipped config; a bad value
named by its key, in one line), YAML and file errors, ``--set`` overrides, the resolved dump."""

from __future__ import annotations

import pytest
import yaml

from sparsetrain.config import dump_params, load_params, params_from_dict
from sparsetrain.errors import ConfigError
from tests.helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    params = load_params(path)
    assert params.runconfig.max_steps > 0


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"model": {"hiden_size": 3}}, "model.hiden_size: unknown key; did you mean 'hidden_size'?"),
        ({"runconfig": {"max_step": 3}}, "did you mean 'max_steps'"),
        ({"modle": {}}, "modle: unknown section; did you mean 'model'?"),
        ({"model": {"hidden_size": "big"}}, "model.hidden_size: expected an integer, got 'big'"),
        ({"model": {"hidden_size": True}}, "model.hidden_size: expected an integer"),
        ({"model": {"hidden_size": 0}}, "model.hidden_size: 0 is below the minimum 1"),
        ({"model": {"preset": "gpt5"}}, "model.preset: 'gpt5' is not valid; choose one of gpt2-tiny"),
        ({"model": {"hidden_size": 30, "num_heads": 4}}, "model.num_heads: 4 does not divide hidden_size 30"),
        ({"optimizer": {"optimizer_type": "Adagrad"}}, "optimizer.optimizer_type: 'Adagrad' is not valid"),
        ({"optimizer": {"learning_rate": [{"scheduler": "Cosine", "initial_learning_rate": 1}]}}, "optimizer.learning_rate[0].scheduler"),
        ({"optimizer": {"learning_rate": [{"scheduler": "Linear", "initial_learning_rate": 0.1}, {"scheduler": "Constant", "initial_learning_rate": 0.1}]}}, "learning_rate[0].total_iters: required"),
        ({"optimizer": {"grad_accum_steps": 3}}, "optimizer.grad_accum_steps: 3 does not divide train_input.batch_size 16"),
        ({"runconfig": {"device": "tpu"}}, "runconfig.device: 'tpu' is not valid"),
        ({"runconfig": {"compile": "maybe"}}, "runconfig.compile: 'maybe' is not valid"),
        ({"runconfig": {"precision": "fp8"}}, "runconfig.precision: 'fp8' is not valid; choose one of auto, fp32, bf16"),
        ({"train_input": {"source": "web"}}, "train_input.source: 'web' is not valid"),
        ({"runconfig": {"sparse_kernels": "on"}}, "runconfig.sparse_kernels: 'on' is not valid; choose one of auto, off"),
        ({"runconfig": {"sparse_kernels": True}}, "choose one of auto, off (YAML reads unquoted on/off/yes/no"),
        ({"runconfig": {"nonfinite": False}}, "runconfig.nonfinite: False is not valid; choose one of stop, skip"),
        ({"train_input": {"max_sequence_length": 4096}}, "train_input.max_sequence_length: 4096 exceeds model.max_position_embeddings"),
        ({"model": [1, 2]}, "model: expected a mapping"),
        ({"optimizer": {"weight_decay_rate": float("nan")}}, "not a finite number"),
    ],
)
def test_bad_values_name_the_key(raw, fragment):
    with pytest.raises(ConfigError) as e:
        params_from_dict(raw)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 3\n bad: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: YAML syntax error"):
        load_params(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  hidden_sise: 3\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: model.hidden_sise: unknown key"):
        load_params(wrong)
    for text in ("", "# only a comment\n", "---\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ConfigError, match=r"empty.yaml: the params file is empty; expected a mapping with sections train_input"):
            load_params(empty)


def test_overrides_apply_and_are_recorded(tiny_params, write_params):
    path = write_params(tiny_params())
    p = load_params(path, ["runconfig.max_steps=7", "model.dropout_rate=0.1", "optimizer.learning_rate=2e-3"])
    assert p.runconfig.max_steps == 7 and p.model.dropout_rate == 0.1
    assert p.optimizer.learning_rate == pytest.approx(2e-3)
    text = dump_params(p, ["runconfig.max_steps=7"])
    assert "# --set runconfig.max_steps=7" in text
    assert yaml.safe_load(text)["runconfig"]["max_steps"] == 7
    with pytest.raises(ConfigError, match="runconfig.max_stepz: unknown key"):
        load_params(path, ["runconfig.max_stepz=7"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_params(path, ["max_steps=7"])


def test_resolved_params_round_trip(tiny_params):
    p = params_from_dict(tiny_params())
    again = params_from_dict(yaml.safe_load(dump_params(p)))
    assert again.to_dict() == p.to_dict()
