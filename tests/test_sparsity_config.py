"""The ``sparsity:`` block: the seed's four forms, parameter selection, and every bad config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain.config.sparsity import GroupSettings, parse_sparsity
from sparsetrain.errors import ConfigError
from sparsetrain.sparsity.select import select_parameters


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.norm_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(d, 4 * d)
        self.mlp.proj = nn.Linear(4 * d, d)


class TinyGPT(nn.Module):
    def __init__(self, tied: bool, d: int = 4, vocab: int = 11, n_layer: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_positions = nn.Embedding(8, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight


def _layer_names(*suffixes: str, n_layer: int = 2) -> list[str]:
    return [f"layers.{i}.{s}" for i in range(n_layer) for s in suffixes]


def _select(block, tied: bool = False) -> dict[str, GroupSettings]:
    model = TinyGPT(tied)
    named = list(model.named_parameters(remove_duplicate=False))
    tied_names = {"lm_head.weight", "embed_tokens.weight"} if tied else set()
    return select_parameters(parse_sparsity(block), named, tied_names)


MATRICES = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")


@pytest.mark.parametrize("tied", [False, True])
def test_form1_default_heuristic_takes_every_block_matrix(tied):
    chosen = _select({"type": "sideband", "sparsity": 0.3, "init_method": "random", "seed": 1234}, tied)
    assert list(chosen) == _layer_names(*MATRICES)
    assert set(chosen.values()) == {GroupSettings(0.3, "random", 1234, None)}


def test_default_heuristic_skips_a_head_known_only_as_tied():
    model = TinyGPT(tied=False)
    named = list(model.named_parameters())
    chosen = select_parameters(
        parse_sparsity({"sparsity": 0.5}), [("head.weight", model.lm_head.weight)] + named[1:], {"head.weight"}
    )
    assert "head.weight" not in chosen


@pytest.mark.parametrize("tied", [False, True])
def test_form2_one_regex(tied):
    chosen = _select({"sparsity": 0.3, "param_name_patterns": "mlp.*weight"}, tied)
    assert list(chosen) == _layer_names("mlp.fc.weight", "mlp.proj.weight")
    assert {g.pattern for g in chosen.values()} == {"mlp.*weight"}


@pytest.mark.parametrize("tied", [False, True])
def test_form3_any_of_several_regexes(tied):
    block = {"sparsity": 0.3, "init_method": "topk", "param_name_patterns": ["mlp.*weight", "attn.proj.*weight"]}
    chosen = _select(block, tied)
    assert list(chosen) == _layer_names("attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")
    assert {g.sparsity for g in chosen.values()} == {0.3}


@pytest.mark.parametrize("tied", [False, True])
def test_form4_per_group_settings_first_match_wins(tied):
    block = {
        "sparsity": 0.75,
        "seed": 7,
        "param_name_patterns": {
            "mlp.fc.*weight": {"sparsity": 0.5},
            "mlp.*weight": {"sparsity": 0.25, "init_method": "random"},
            "attn.*weight": None,
        },
    }
    chosen = _select(block, tied)
    assert list(chosen) == _layer_names(*MATRICES)
    for i in range(2):
        assert chosen[f"layers.{i}.mlp.fc.weight"] == GroupSettings(0.5, "topk", 7, "mlp.fc.*weight")
        assert chosen[f"layers.{i}.mlp.proj.weight"] == GroupSettings(0.25, "random", 7, "mlp.*weight")
        assert chosen[f"layers.{i}.attn.qkv.weight"] == GroupSettings(0.75, "topk", 7, "attn.*weight")


def test_form4_sparsity_only_in_groups():
    block = {
        "type": "sideband",
        "param_name_patterns": {"fc.*weight": {"sparsity": 0.3}, "proj.*weight": {"sparsity": 0.4}},
    }
    chosen = _select(block)
    assert chosen["layers.0.mlp.fc.weight"].sparsity == 0.3
    assert chosen["layers.0.attn.proj.weight"].sparsity == 0.4
    assert chosen["layers.1.mlp.proj.weight"].sparsity == 0.4


def test_explicit_patterns_skip_one_dimensional_but_may_take_embeddings():
    chosen = _select({"sparsity": 0.5, "param_name_patterns": "weight"})
    assert "norm_f.weight" not in chosen and "layers.0.norm_1.weight" not in chosen
    assert {"embed_tokens.weight", "embed_positions.weight", "lm_head.weight"} <= set(chosen)


def test_pattern_matches_a_tied_head_through_its_alias():
    chosen = _select({"sparsity": 0.5, "param_name_patterns": "lm_head"}, tied=True)
    assert list(chosen) == ["embed_tokens.weight"]


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
    ([1, 2], "sparsity: expected a mapping"),
    ({"sparsity": 0.3, "type": "foo"}, "sparsity.type: 'foo' is not valid; choose one of sideband, static"),
    ({"sparsity": 0.3, "type": "rigl"}, "sparsity.type: 'rigl' is not supported yet, only sideband/static"),
    ({"sparsity": 0.3, "type": "gmp"}, "not supported yet"),
    ({"sparsity": 0.3, "type": 3}, "sparsity.type: expected a string"),
    ({"sparsity": 0.3, "type": "static", "algorithm": "static"}, "sparsity.algorithm"),
    ({"sparsity": 1.0}, "sparsity.sparsity: 1 is not valid; expected a number in [0, 1)"),
    ({"sparsity": 75}, "did you mean 0.75?"),
    ({"sparsity": -0.1}, "sparsity.sparsity: -0.1 is not valid"),
    ({"sparsity": float("nan")}, "sparsity.sparsity: nan is not valid"),
    ({"sparsity": True}, "sparsity.sparsity: expected a number in [0, 1), got bool True"),
    ({"sparsity": "0.3"}, "sparsity.sparsity: expected a number"),
    ({"init_method": "topk"}, "sparsity.sparsity: required"),
    (
        {"sparsity": 0.3, "init_method": "foo"},
        "sparsity.init_method: 'foo' is not valid; choose one of topk, random, from_zeros",
    ),
    ({"sparsity": 0.3, "seed": 1.5}, "sparsity.seed: expected an integer"),
    ({"sparsity": 0.3, "seed": False}, "sparsity.seed: expected an integer"),
    ({"sparsity": 0.3, "sparsty": 0.3}, "sparsity.sparsty: unknown key; did you mean 'sparsity'?"),
    ({"sparsity": 0.3, "init": "topk"}, "sparsity.init: unknown key; did you mean 'init_method'?"),
    ({"sparsity": 0.3, "update": {"freq": 10}}, "sparsity.update: not supported yet"),
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
        "sparsity.param_name_patterns[\"mlp.*weight\"].init_method: 'foo' is not valid; choose one of topk, random, from_zeros",
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


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (
            "decoder.*weight",
            "sparsity.param_name_patterns ('decoder.*weight'): matches no parameter; the model's parameters are: embed_tokens.weight",
        ),
        (["mlp", "nope"], "sparsity.param_name_patterns[1] ('nope'): matches no parameter"),
        ({"mlp": {}, "nope": {}}, 'sparsity.param_name_patterns["nope"]: matches no parameter'),
        ("bias", "sparsity.param_name_patterns ('bias'): matches only one-dimensional parameters"),
    ],
)
def test_pattern_that_selects_nothing_is_an_error(patterns, message):
    with pytest.raises(ConfigError) as info:
        _select({"sparsity": 0.3, "param_name_patterns": patterns})
    assert message in str(info.value)
    assert "layers.N.mlp.fc.weight" in str(info.value)  # layer indices folded


def test_long_name_lists_are_cut():
    named = [(f"w{i}", torch.zeros(2, 2)) for i in range(100)]
    with pytest.raises(ConfigError, match=r"w29, \.\.\. \(70 more\)$"):
        select_parameters(parse_sparsity({"sparsity": 0.3, "param_name_patterns": "nope"}), named)


def test_default_heuristic_on_a_model_with_no_matrix_is_an_error():
    with pytest.raises(ConfigError, match="default heuristic selects no parameter"):
        select_parameters(
            parse_sparsity({"sparsity": 0.3}), [("norm.weight", torch.ones(3)), ("embed.weight", torch.ones(3, 3))]
        )


def test_shadowed_pattern_only_warns(logs):
    chosen = _select({"sparsity": 0.3, "param_name_patterns": {"mlp": {}, "mlp.fc": {"sparsity": 0.5}}})
    assert {g.pattern for g in chosen.values()} == {"mlp"}
    assert "taken by an earlier pattern" in logs.text
