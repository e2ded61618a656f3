"""User errors from the command line and the resolved params: a ``--set`` value YAML cannot read is
an error naming the flag and how to write it (never the text as a string); errors about keys that
``--set`` / ``--unset`` changed name the flag, not the file; an out-of-range sparsity says what
the number means without guessing another; eval_input shows the tokenizer evaluation uses."""

from __future__ import annotations

import pytest
import yaml

from sparsetrain.config import dump_params, load_params, params_from_dict, parse_override
from sparsetrain.errors import ConfigError
from tests.helpers import ROOT, cli

TINY_SPARSE = ROOT / "configs" / "gpt2_tiny_sparse.yaml"
REGEX = r".*attn\.(qkv|proj)\.weight"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- 1. a --set value that is not valid YAML -------------------------------------------------------


def test_set_value_with_bad_escape_is_one_error_line_with_the_fix(capsys):
    bad = f'sparsity.param_name_patterns=["{REGEX}"]'  # \. is no escape in YAML double quotes
    assert cli("plan", "-p", TINY_SPARSE, "--set", bad) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: --set sparsity.param_name_patterns: the value is not valid YAML"), line
    assert "unknown escape character" in line and "single quotes" in line
    assert f"['{REGEX}']" in line  # the way to write it
    assert str(TINY_SPARSE) not in line  # the file holds no such value
    # The suggested spelling reads as the list of one regex that was meant.
    assert parse_override(f"sparsity.param_name_patterns=['{REGEX}']")[1] == [REGEX]


@pytest.mark.parametrize(("value", "fix"), [
    ("*.txt", "'*.txt'"),  # a leading * is a YAML alias
    ("@data", "'@data'"),
    ("2001-02-30", "'2001-02-30'"),  # a date YAML cannot construct
    ("[[[", "a list as [a, b]"),
    ("{a: 1", "a mapping as {k: v}"),
])
def test_set_values_yaml_cannot_read_are_errors_not_strings(value, fix):
    with pytest.raises(ConfigError) as e:
        load_params(TINY_SPARSE, [f"train_input.data_path={value}"])
    text = str(e.value)
    assert text.startswith("--set train_input.data_path: the value is not valid YAML ("), text
    assert fix in text and "\n" not in text


def test_plain_words_and_paths_still_read_as_text():
    p = load_params(TINY_SPARSE, ["train_input.data_path=/tmp/a b", "runconfig.device=cpu", "runconfig.eval_steps="])
    assert p.train_input.data_path == "/tmp/a b" and p.runconfig.device == "cpu" and p.runconfig.eval_steps is None


# -- 2. errors about keys the command line changed name the flag ------------------------------------


def test_set_key_typo_names_the_flag_and_suggests(capsys):
    assert cli("plan", "-p", TINY_SPARSE, "--set", "runconfig.max_step=2") == 2
    line = _one_error_line(capsys)
    assert line == "error: --set runconfig.max_step: unknown key; did you mean 'max_steps'?"


def test_set_bad_values_name_the_flag_and_file_keys_still_name_the_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_params(TINY_SPARSE, ["runconfig.max_steps=abc"])
    assert str(e.value) == "--set runconfig.max_steps: expected an integer, got 'abc'"
    with pytest.raises(ConfigError) as e:
        load_params(TINY_SPARSE, ["model.initializer={name: normal, sdt: 0.1}"])  # a key inside the value
    assert str(e.value) == ("--set model.initializer: model.initializer.sdt: not a key of the normal initializer; "
                            "did you mean 'std'?")
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(TINY_SPARSE.read_text().replace("max_steps:", "max_step:"))
    with pytest.raises(ConfigError) as e:
        load_params(bad_file, ["runconfig.log_steps=3"])
    assert str(e.value) == f"{bad_file}: runconfig.max_step: unknown key; did you mean 'max_steps'?"


def test_errors_found_with_the_model_name_the_flag(capsys):
    assert cli("plan", "-p", TINY_SPARSE, "--set", "sparsity.param_name_patterns=['nomatch']") == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: --set sparsity.param_name_patterns: "), line
    assert "matches no parameter" in line and str(TINY_SPARSE) not in line


def test_unset_names_a_near_key_and_refuses_a_value():
    with pytest.raises(ConfigError) as e:
        load_params(TINY_SPARSE, unset=["runconfig.max_step"])
    assert str(e.value).endswith("--unset 'runconfig.max_step': no such key in the params file; "
                                 "did you mean runconfig.max_steps?")
    with pytest.raises(ConfigError) as e:
        load_params(TINY_SPARSE, unset=["runconfig.max_steps=3"])
    assert str(e.value).startswith("--unset 'runconfig.max_steps=3': takes a key without a value")
    assert "use --set" in str(e.value)


def test_set_into_a_value_names_the_flag():
    with pytest.raises(ConfigError) as e:
        load_params(TINY_SPARSE, ["runconfig.max_steps.x=1"])
    assert str(e.value) == "--set runconfig.max_steps.x: runconfig.max_steps is a value (int), not a section with keys"


# -- 3. an out-of-range fraction: what it means, no guess ---------------------------------------------


@pytest.mark.parametrize("block", [
    {"sparsity": 1.5},
    {"sparsity": 50},
    {"sparsity": [0.5, 1.5], "type": "gmp"},  # cycling levels
])
def test_sparsity_out_of_range_says_what_it_means_without_guessing(block):
    with pytest.raises(ConfigError) as e:
        params_from_dict({"sparsity": block})
    text = str(e.value)
    assert "is not valid; expected a number in [0, 1), the fraction of weights pruned" in text
    assert "0.75 prunes 75%" in text and "did you mean" not in text


def test_cycling_drop_fractions_are_checked_like_a_constant():
    with pytest.raises(ConfigError) as e:  # was clamped to 1 without a word
        params_from_dict({"sparsity": {"type": "rigl", "sparsity": 0.5, "drop_fraction": [0.3, 2.0]}})
    text = str(e.value)
    assert text.startswith("sparsity.drop_fraction[1]: 2 is not valid; the fraction of kept entries dropped, in [0, 1]")
    assert "0.3 drops 30%" in text and "did you mean" not in text


# -- 4. eval_input shows the tokenizer evaluation uses ------------------------------------------------


def test_resolved_eval_input_shows_the_train_tokenizer(tmp_path, capsys):
    bpe = ROOT / "configs" / "gpt2_small_sparse_list.yaml"  # train_input: bpe 32768; eval_input: none
    p = load_params(bpe)
    assert (p.eval_input.tokenizer, p.eval_input.bpe_vocab_size) == ("bpe", 32768)
    dumped = yaml.safe_load(dump_params(p))
    assert dumped["eval_input"]["tokenizer"] == dumped["train_input"]["tokenizer"] == "bpe"
    assert dumped["eval_input"]["bpe_vocab_size"] == dumped["train_input"]["bpe_vocab_size"] == 32768
    assert cli("convert-params", bpe, "-o", tmp_path / "out.yaml") == 0
    written = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert written["eval_input"]["bpe_vocab_size"] == 32768
    assert load_params(tmp_path / "out.yaml") == p  # the resolved file reads back as the same run


@pytest.mark.parametrize(("change", "key"), [
    ("eval_input.tokenizer=byte", "eval_input.tokenizer: 'byte' differs from train_input.tokenizer 'bpe'"),
    ("eval_input.bpe_vocab_size=1000", "eval_input.bpe_vocab_size: 1000 differs from train_input.bpe_vocab_size 32768"),
])
def test_an_eval_tokenizer_that_would_be_ignored_is_an_error(change, key):
    with pytest.raises(ConfigError) as e:
        load_params(ROOT / "configs" / "gpt2_small_sparse_list.yaml", [change])
    assert str(e.value).startswith(f"--set {key}; evaluation encodes with train_input's tokenizer"), str(e.value)


def test_eval_bpe_vocab_size_is_train_inputs_where_no_bpe_is_trained():
    p = load_params(TINY_SPARSE, ["eval_input.bpe_vocab_size=1000"])  # byte tokenizer: read by neither
    assert p.eval_input.tokenizer == "byte" and p.eval_input.bpe_vocab_size == p.train_input.bpe_vocab_size


def test_set_value_whose_end_yaml_drops_as_a_comment_is_an_error():
    with pytest.raises(ConfigError) as e:  # was silently "runs/exp"
        load_params(TINY_SPARSE, ["runconfig.model_dir=runs/exp #2"])
    assert str(e.value) == ("--set runconfig.model_dir: YAML reads '#2' as a comment and drops it; quote it in YAML "
                            "to pass it as text: --set \"runconfig.model_dir='runs/exp #2'\"")
    assert load_params(TINY_SPARSE, ["runconfig.model_dir=runs/exp#2"]).runconfig.model_dir == "runs/exp#2"


def test_an_unknown_section_from_a_flag_names_the_flag(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: {hidden_size: 32}\n")
    with pytest.raises(ConfigError) as e:
        load_params(path, ["runconfg.max_steps=2"])
    assert str(e.value) == "--set runconfg.max_steps: runconfg: unknown section; did you mean 'runconfig'?"
