"""``config/sparsity.py``: the ``sparsity:`` block parsed into a ``SparsityConfig`` (the seed's
four forms round-trip, defaults, structure ``block`` / ``N:M`` at the top level and per group),
and every bad block named by its key in one line. Which parameters a block selects is in
``sparsity/test_select.py``."""

from __future__ import annotations

import pytest

from sparsetrain.config.sparsity import GroupSettings, parse_sparsity
from sparsetrain.errors import ConfigError


def test_to_dict_round_trips_every_form():
    blocks = [
        {"sparsity": 0.3, "init_method": "random", "seed": 1234},
        {"type": "static", "sparsity": 0.3, "param_name_patterns": "fc.*weight"},
        {"sparsity": 0.3, "init_method": "topK", "param_name_patterns": ["fc.*weight", "proj.*weight"]},
        {"sparsity": 0.3, "param_name_patterns": {"fc.*weight": {"seed": 3}, "proj": {"sparsity": 0.4}}},
        {"param_name_patterns": {"fc.*weight": {"sparsity": 0.3}}},
    ]
    for block in blocks:
        config = parse_sparsity(block)
        again = parse_sparsity(config.to_dict())
        assert again == config
        assert again.to_dict() == config.to_dict()
    assert parse_sparsity(blocks[1]).to_dict()["type"] == "sideband"
    assert parse_sparsity(blocks[2]).init_method == "topk"
    assert parse_sparsity(blocks[3]).to_dict()["param_name_patterns"] == {
        "fc.*weight": {"seed": 3},
        "proj": {"sparsity": 0.4},
    }
    assert "fc.*weight" in parse_sparsity(blocks[3]).describe()


def test_empty_block_is_dense():
    assert parse_sparsity(None) is None
    assert parse_sparsity({}) is None


def test_defaults():
    config = parse_sparsity({"sparsity": 0})
    assert (config.type, config.init_method, config.seed, config.sparsity) == ("sideband", "topk", 0, 0.0)


BAD_BLOCKS = [
    ([1, 2], "sparsity[0]: expected a mapping of settings, got int 1"),
    ("0.5", "sparsity: expected a mapping of settings, got str '0.5'"),
    ({"sparsity": 0.3, "type": "foo"}, "sparsity.type: 'foo' is not valid; choose one of sideband, static, gmp, set, rigl"),
    ({"sparsity": 0.3, "type": "gmp"}, "sparsity.sparsity: gmp with a constant sparsity 0.3 would never change the masks"),
    ({"sparsity": {"type": "linear", "init": 0.1, "slope": 0.01}}, "sparsity.sparsity: a schedule of the level needs dynamic sparsity"),
    ({"sparsity": 0.3, "drop_fraction": 0.2}, "sparsity.drop_fraction: read only by dynamic sparsity (algorithm gmp, set or rigl)"),
    ({"sparsity": {"type": "linear", "init": 0.1, "slope": 0.01}, "type": "gmp", "drop_fraction": 0.2},
     "sparsity.drop_fraction: gmp only prunes (by |w|); drop_fraction is read by set and rigl"),
    ({"sparsity": 0.3, "type": "set", "drop_fraction": 1.5}, "sparsity.drop_fraction: 1.5 is not valid; the fraction of kept entries dropped, in [0, 1]"),
    ({"type": "rigl", "structure": "2:4"}, "sparsity.structure: '2:4' keeps N of every M fixed"),
    ({"sparsity": 0.5, "type": "rigl", "schedule": {"freq": 10}, "update": {"freq": 5}}, "sparsity.schedule: here the update rule"),
    ({"sparsity": 0.5, "type": "gmp", "schedule": {"type": "linear", "init": 0, "slope": 0.1}},
     "sparsity.schedule: here an alias of sparsity (2.2+), and sparsity.sparsity is set too"),
    ({"sparsity": 0.5, "type": "rigl", "balance_in_groups": 4}, "sparsity.balance_in_groups: RigL's balanced per-group competition is not built"),
    ({"sparsity": 0.5, "type": "rigl", "update": {"freq": 0}}, "sparsity.update.freq: expected an integer >= 1, got 0"),
    ({"sparsity": 0.5, "distribution": "er"}, "sparsity.distribution: 'er' is not valid; choose one of uniform, erk"),
    ({"sparsity": 0.3, "type": 3}, "sparsity.type: expected a string"),
    ({"sparsity": 0.3, "type": "static", "algorithm": "static"}, "sparsity.algorithm"),
    ({"sparsity": 1.0}, "sparsity.sparsity: 1 is not valid; expected a number in [0, 1)"),
    ({"sparsity": 75}, "sparsity.sparsity: 75 is not valid; expected a number in [0, 1), the fraction of weights pruned"),
    ({"sparsity": -0.1}, "sparsity.sparsity: -0.1 is not valid"),
    ({"sparsity": float("nan")}, "sparsity.sparsity: nan is not valid"),
    ({"sparsity": True}, "sparsity.sparsity: expected a number in [0, 1), got bool True"),
    ({"sparsity": "0.3x"}, "sparsity.sparsity: expected a number"),
    ({"init_method": "topk"}, "sparsity.sparsity: required"),
    (
        {"sparsity": 0.3, "init_method": "foo"},
        "sparsity.init_method: 'foo' is not valid; choose one of topk, random, from_zeros, checkerboard",
    ),
    ({"sparsity": 0.3, "seed": 1.5}, "sparsity.seed: expected an integer"),
    ({"sparsity": 0.3, "seed": False}, "sparsity.seed: expected an integer"),
    ({"sparsity": 0.3, "sparsty": 0.3}, "sparsity.sparsty: unknown key; did you mean 'sparsity'?"),
    ({"sparsity": 0.3, "init": "topk"}, "sparsity.init: unknown key; did you mean 'init_method'?"),
    ({"sparsity": 0.3, "update": {"freq": 10}}, "sparsity.update: read only by dynamic sparsity"),
    ({"sparsity": 0.3, "param_name_patterns": 5}, "sparsity.param_name_patterns: expected a regex string"),
    ({"sparsity": 0.3, "param_name_patterns": []}, "sparsity.param_name_patterns: empty list"),
    ({"sparsity": 0.3, "param_name_patterns": {}}, "sparsity.param_name_patterns: empty mapping"),
    ({"sparsity": 0.3, "param_name_patterns": ["fc", 3]}, "sparsity.param_name_patterns[1]: expected a regex string"),
    ({"sparsity": 0.3, "param_name_patterns": "fc(["}, "sparsity.param_name_patterns: 'fc([' is not a valid regex"),
    (
        {"sparsity": 0.3, "param_name_patterns": ["fc", "a)"]},
        "sparsity.param_name_patterns[1]: 'a)' is not a valid regex",
    ),
    (
        {"sparsity": 0.3, "param_name_patterns": {"x[": {}}},
        "sparsity.param_name_patterns[\"x[\"]: 'x[' is not a valid regex",
    ),
    ({"sparsity": 0.3, "param_name_patterns": {"fc": 0.3}}, 'sparsity.param_name_patterns["fc"]: expected a mapping'),
    ({"sparsity": 0.3, "param_name_patterns": {1: {}}}, "sparsity.param_name_patterns: pattern 1 is not a string"),
    (
        {"sparsity": 0.3, "param_name_patterns": {"mlp.*weight": {"init_method": "foo"}}},
        "sparsity.param_name_patterns[\"mlp.*weight\"].init_method: 'foo' is not valid; choose one of topk, random, from_zeros, checkerboard",
    ),
    (
        {"sparsity": 0.3, "param_name_patterns": {"fc": {"sparsity": 2}}},
        'sparsity.param_name_patterns["fc"].sparsity: 2 is not valid',
    ),
    (
        {"sparsity": 0.3, "param_name_patterns": {"fc": {"seed": "x"}}},
        'sparsity.param_name_patterns["fc"].seed: expected an integer',
    ),
    (
        {"sparsity": 0.3, "param_name_patterns": {"fc": {"sed": 1}}},
        "sparsity.param_name_patterns[\"fc\"].sed: unknown key; did you mean 'seed'?",
    ),
    (
        {"sparsity": 0.3, "param_name_patterns": {"fc": {"type": "static"}}},
        'sparsity.param_name_patterns["fc"].type: cannot be set per group',
    ),
    (
        {"param_name_patterns": {"fc": {"sparsity": 0.3}, "proj": {}}},
        'sparsity.param_name_patterns["proj"].sparsity: required',
    ),
    ({"param_name_patterns": ["fc"]}, "sparsity.sparsity: required"),
]


@pytest.mark.parametrize(("block", "message"), BAD_BLOCKS)
def test_bad_block_names_the_key(block, message):
    with pytest.raises(ConfigError) as info:
        parse_sparsity(block)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_where_prefixes_messages():
    with pytest.raises(ConfigError, match=r"^params\.sparsity\.seed: "):
        parse_sparsity({"sparsity": 0.3, "seed": "x"}, where="params.sparsity")


# -- structure: block and N:M -------------------------------------------------------------------


def test_defaults_are_unstructured_and_old_positional_settings_still_work():
    config = parse_sparsity({"sparsity": 0.5})
    assert config.structure == "unstructured" and config.groups[0] == GroupSettings(0.5, "topk", 0, None)
    assert config.groups[0].block_size is None and config.groups[0].nm is None


def test_block_at_top_level_with_default_and_explicit_block_size():
    g = parse_sparsity({"sparsity": 0.75, "structure": "block"}).groups[0]
    assert (g.structure, g.block_size, g.structure_label) == ("block", (128, 128), "block 128x128")
    g = parse_sparsity({"sparsity": 0.75, "structure": "Block", "block_size": 16}).groups[0]
    assert g.block_size == (16, 16)
    g = parse_sparsity({"sparsity": 0.75, "structure": "block", "block_size": [32, 64]}).groups[0]
    assert g.block_size == (32, 64) and g.structure_label == "block 32x64"


def test_structure_per_group_and_top_level_inheritance():
    config = parse_sparsity({
        "sparsity": 0.75,
        "structure": "block",
        "block_size": 16,
        "param_name_patterns": {
            "mlp.fc": {},
            "mlp.proj": {"block_size": [8, 32], "sparsity": 0.5},
            "attn.qkv": {"structure": "2:4"},  # the top-level 0.75 does not apply to N:M
            "attn.proj": {"structure": "unstructured", "init_method": "random"},
        },
    })
    fc, proj, qkv, aproj = config.groups
    assert (fc.structure, fc.block_size, fc.sparsity) == ("block", (16, 16), 0.75)
    assert (proj.structure, proj.block_size, proj.sparsity) == ("block", (8, 32), 0.5)
    assert (qkv.structure, qkv.block_size, qkv.sparsity) == ("2:4", None, 0.5)
    assert (aproj.structure, aproj.block_size, aproj.sparsity) == ("unstructured", None, 0.75)
    assert "block 16x16" in config.describe() and "2:4" in config.describe()


@pytest.mark.parametrize("block", [
    {"sparsity": 0.5, "structure": "block", "block_size": 16},
    {"structure": "2:4", "init_method": "random", "seed": 3},
    {"sparsity": 0.75, "structure": "block", "block_size": [16, 8], "param_name_patterns": {
        "mlp": {}, "attn": {"structure": "2:4"}, "x": {"structure": "unstructured", "sparsity": 0.3}}},
    {"structure": "4:8", "param_name_patterns": {"mlp": {}, "attn": {"structure": "block", "sparsity": 0.5, "block_size": 4}}},
    {"sparsity": 0.5, "param_name_patterns": ["mlp", "attn"], "structure": "block"},
])
def test_to_dict_round_trips_structure(block):
    config = parse_sparsity(block)
    again = parse_sparsity(config.to_dict())
    assert again == config and again.to_dict() == config.to_dict()
    assert config.to_dict()["structure"] == config.structure


BAD_STRUCTURES = [
    ({"sparsity": 0.3, "structure": "2:4"}, "sparsity.sparsity: 0.3 does not match sparsity.structure '2:4'"),
    ({"sparsity": 0.3, "structure": "diagonal"}, "sparsity.structure: 'diagonal' is not valid"),
    ({"sparsity": 0.3, "structure": "4:2"}, "sparsity.structure: '4:2' is not valid; N:M needs 0 < N < M <= 64"),
    ({"sparsity": 0.3, "structure": "0:4"}, "sparsity.structure: '0:4' is not valid"),
    ({"sparsity": 0.3, "structure": "1:128"}, "sparsity.structure: '1:128' is not valid"),
    ({"sparsity": 0.3, "structure": 5}, "sparsity.structure: 5 is not valid"),
    ({"sparsity": 0.3, "structure": ["block"]}, "sparsity.structure: expected a string"),
    ({"sparsity": 0.3, "structure": "block", "block_size": 0}, "sparsity.block_size: 0 is not valid"),
    ({"sparsity": 0.3, "structure": "block", "block_size": [16]}, "sparsity.block_size: [16] is not valid"),
    ({"sparsity": 0.3, "structure": "block", "block_size": True}, "sparsity.block_size: True is not valid"),
    ({"sparsity": 0.3, "structure": "block", "block_size": 1.5}, "sparsity.block_size: 1.5 is not valid"),
    ({"sparsity": 0.3, "block_size": 16}, "sparsity.block_size: set, but no group has structure: block"),
    ({"structure": "2:4", "block_size": 16}, "sparsity.block_size: set, but no group"),
    ({"sparsity": 0.3, "structre": "block"}, "sparsity.structre: unknown key; did you mean 'structure'?"),
    ({"sparsity": 0.3, "blocksize": 16}, "sparsity.blocksize: unknown key; did you mean 'block_size'?"),
    ({"structure": "block"}, "sparsity.sparsity: required"),
    (
        {"sparsity": 0.3, "param_name_patterns": {"fc": {"structure": "1:4", "sparsity": 0.5}}},
        'sparsity.param_name_patterns["fc"].sparsity: 0.5 does not match sparsity.param_name_patterns["fc"].structure \'1:4\'',
    ),
    (
        {"structure": "2:4", "param_name_patterns": {"fc": {"sparsity": 0.75}}},
        'sparsity.param_name_patterns["fc"].sparsity: 0.75 does not match sparsity.structure \'2:4\'',
    ),
    (
        {"sparsity": 0.3, "param_name_patterns": {"fc": {"block_size": 16}}},
        'sparsity.param_name_patterns["fc"].block_size: this group\'s structure is \'unstructured\'',
    ),
    (
        {"sparsity": 0.3, "param_name_patterns": {"fc": {"structure": "bloc"}}},
        'sparsity.param_name_patterns["fc"].structure: \'bloc\' is not valid',
    ),
    (
        {"structure": "2:4", "param_name_patterns": {"fc": {"structure": "block"}}},
        'sparsity.param_name_patterns["fc"].sparsity: required',
    ),
    (
        {"sparsity": 0.3, "param_name_patterns": {"fc": {"structur": "block"}}},
        "sparsity.param_name_patterns[\"fc\"].structur: unknown key; did you mean 'structure'?",
    ),
]


@pytest.mark.parametrize(("block", "message"), BAD_STRUCTURES)
def test_bad_structure_names_the_key(block, message):
    with pytest.raises(ConfigError) as info:
        parse_sparsity(block)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
