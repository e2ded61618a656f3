"""``config/sparsity_values.py``: single keys of the ``sparsity:`` block -- an ``N:M`` structure
implies its sparsity, YAML's base-60 reading of an unquoted ``N:M`` is undone or named as typed,
and keys and patterns that break a message (line breaks, overflowing or deeply nested regexes)
still give one line."""

from __future__ import annotations

import pytest

from sparsetrain.config import params_from_dict
from sparsetrain.config.sparsity import parse_sparsity
from sparsetrain.errors import ConfigError, UserError


def test_nm_sparsity_is_implied_or_must_match():
    g = parse_sparsity({"structure": "2:4"}).groups[0]
    assert (g.structure, g.nm, g.sparsity) == ("2:4", (2, 4), 0.5)
    assert parse_sparsity({"structure": " 1 : 4 ", "sparsity": 0.75}).groups[0].structure == "1:4"
    assert parse_sparsity({"structure": "1:3", "sparsity": 0.667}).groups[0].sparsity == pytest.approx(2 / 3, abs=1e-15)
    # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124.
    import yaml

    raw = yaml.safe_load("sparsity: {structure: 2:4}")["sparsity"]
    assert raw == {"structure": 124}
    assert parse_sparsity(raw).groups[0].structure == "2:4"


def test_an_unquoted_invalid_nm_is_named_as_typed_not_as_its_base_60_number():
    import yaml

    raw = yaml.safe_load("sparsity: {structure: 3:2}")["sparsity"]  # N > M; YAML reads it as 182
    with pytest.raises(ConfigError, match=r"182 is not valid \(YAML read an unquoted 3:2 as the number 182\)"):
        parse_sparsity(raw)


@pytest.mark.parametrize(
    "block",
    [
        {"spar\nsity": 0.5},  # _check_keys prints the key raw
        {"sparsity": 0.5, "param_name_patterns": {"mlp.*weight": {"se\ned": 1}}},
        {"sparsity": 0.5, "param_name_patterns": "a{4294967296}"},  # re raises OverflowError
        {"sparsity": 0.5, "param_name_patterns": ["(" * 1000 + "a" + ")" * 1000]},  # RecursionError
    ],
    ids=["newline-key", "newline-group-key", "regex-overflow", "regex-recursion"],
)
def test_sparsity_block_errors_are_one_line(block):
    with pytest.raises(UserError) as e:
        params_from_dict({"sparsity": block})
    assert "\n" not in str(e.value), str(e.value)
