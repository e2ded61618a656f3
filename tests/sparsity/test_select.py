"""``sparsity/select.py``: which parameters a ``sparsity:`` block takes, with which settings -- the
default heuristic (every block matrix; embeddings, norms, biases and heads, tied or not, stay
dense), one regex, a list, per-group settings (first match wins), a tied head matched through its
alias -- and patterns that select nothing named in one line. On toy models with GPT's names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain.config.sparsity import GroupSettings, parse_sparsity
from sparsetrain.errors import ConfigError
from sparsetrain.sparsity.select import select_parameters
from sparsetrain.sparsity.sparsifier import sparsify
from tests.helpers import (
    BLOCK_KINDS,
    BLOCK_MATRICES,
    QKV_KINDS,
    TOY_CONTEXT,
    TOY_VOCAB,
    TOY_WIDTH,
    ToyGPT,
    layer_names,
    tiny_gpt,
    toy_gpt,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, WIDTH, CONTEXT = TOY_VOCAB, TOY_WIDTH, TOY_CONTEXT


def _toy(tied: bool) -> ToyGPT:
    """The model of the selection tests: width 4, vocab 11, context 8, ``proj_output_dense_layer`` of width 4."""
    return ToyGPT(tied, d=4, vocab=11, context=8, proj_in=4)


def _select(block, tied: bool = False) -> dict[str, GroupSettings]:
    model = _toy(tied)
    named = list(model.named_parameters(remove_duplicate=False))
    tied_names = {"lm_head.weight", "embedding_layer.word_embeddings.weight"} if tied else set()
    return select_parameters(parse_sparsity(block), named, tied_names)


MATRICES = BLOCK_KINDS
FFN = ("ffn.ffn.0.linear_layer.weight", "ffn.ffn.1.linear_layer.weight")


def test_the_toy_has_the_models_parameter_names():
    for tied in (False, True):
        toy = ToyGPT(tied, d=64, vocab=97, context=32)
        model = tiny_gpt(share_embedding_weights=tied)
        names = [n for n, _ in toy.named_parameters(remove_duplicate=False)]
        assert names == [n for n, _ in model.named_parameters(remove_duplicate=False)]


@pytest.mark.parametrize("tied", [False, True])
def test_form1_default_heuristic_takes_every_block_matrix(tied):
    chosen = _select({"type": "sideband", "sparsity": 0.3, "init_method": "random", "seed": 1234}, tied)
    assert list(chosen) == layer_names(*MATRICES)
    assert set(chosen.values()) == {GroupSettings(0.3, "random", 1234, None)}


def test_default_heuristic_skips_a_head_known_only_as_tied():
    model = _toy(tied=False)
    named = list(model.named_parameters())
    chosen = select_parameters(
        parse_sparsity({"sparsity": 0.5}), [("head.weight", model.lm_head.weight)] + named[1:], {"head.weight"}
    )
    assert "head.weight" not in chosen


def test_default_heuristic_on_tied_and_untied_models():
    for tied in (False, True):
        sparsifier = sparsify(toy_gpt(tied=tied), {"sparsity": 0.5})
        assert list(sparsifier.masks) == BLOCK_MATRICES


class _HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(VOCAB, WIDTH)
        self.transformer.wpe = nn.Embedding(CONTEXT, WIDTH)
        self.transformer.c_fc = nn.Linear(WIDTH, WIDTH)
        self.transformer.ln_f = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.transformer.wte.weight


def test_embedding_modules_and_heads_tied_to_them_stay_dense():
    sparsifier = sparsify(_HFStyle(), {"sparsity": 0.5})
    assert list(sparsifier.masks) == ["transformer.c_fc.weight"]


@pytest.mark.parametrize("tied", [False, True])
def test_form2_one_regex(tied):
    chosen = _select({"sparsity": 0.3, "param_name_patterns": "ffn.*linear_layer.weight"}, tied)
    assert list(chosen) == layer_names(*FFN)
    assert {g.pattern for g in chosen.values()} == {"ffn.*linear_layer.weight"}


@pytest.mark.parametrize("tied", [False, True])
def test_form3_any_of_several_regexes(tied):
    patterns = ["ffn.*linear_layer.weight", "proj_output_dense_layer.weight"]
    block = {"sparsity": 0.3, "init_method": "topk", "param_name_patterns": patterns}
    chosen = _select(block, tied)
    assert list(chosen) == layer_names("self_attn.proj_output_dense_layer.weight", *FFN)
    assert {g.sparsity for g in chosen.values()} == {0.3}


@pytest.mark.parametrize("tied", [False, True])
def test_form4_per_group_settings_first_match_wins(tied):
    block = {
        "sparsity": 0.75,
        "seed": 7,
        "param_name_patterns": {
            "ffn.0.*weight": {"sparsity": 0.5},
            "ffn.*weight": {"sparsity": 0.25, "init_method": "random"},
            "self_attn.*weight": None,
        },
    }
    chosen = _select(block, tied)
    assert list(chosen) == layer_names(*MATRICES)
    for i in range(2):
        layer = f"transformer_decoder.layers.{i}"
        assert chosen[f"{layer}.ffn.ffn.0.linear_layer.weight"] == GroupSettings(0.5, "topk", 7, "ffn.0.*weight")
        assert chosen[f"{layer}.ffn.ffn.1.linear_layer.weight"] == GroupSettings(0.25, "random", 7, "ffn.*weight")
        for kind in (*QKV_KINDS, "self_attn.proj_output_dense_layer.weight"):
            assert chosen[f"{layer}.{kind}"] == GroupSettings(0.75, "topk", 7, "self_attn.*weight")


def test_form4_sparsity_only_in_groups():
    block = {
        "type": "sideband",
        "param_name_patterns": {"ffn.0.*weight": {"sparsity": 0.3}, "(output|ffn.1).*weight": {"sparsity": 0.4}},
    }
    chosen = _select(block)
    assert chosen["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"].sparsity == 0.3
    assert chosen["transformer_decoder.layers.0.self_attn.proj_output_dense_layer.weight"].sparsity == 0.4
    assert chosen["transformer_decoder.layers.1.ffn.ffn.1.linear_layer.weight"].sparsity == 0.4


def test_explicit_patterns_skip_one_dimensional_but_may_take_embeddings():
    chosen = _select({"sparsity": 0.5, "param_name_patterns": "weight"})
    assert "transformer_decoder.norm.weight" not in chosen and "ln_f.weight" not in chosen
    assert "transformer_decoder.layers.0.norm1.weight" not in chosen
    embeddings = {"embedding_layer.word_embeddings.weight", "embedding_layer.position_embeddings.weight"}
    assert {*embeddings, "lm_head.weight"} <= set(chosen)


def test_pattern_matches_a_tied_head_through_its_alias():
    chosen = _select({"sparsity": 0.5, "param_name_patterns": "lm_head"}, tied=True)
    assert list(chosen) == ["embedding_layer.word_embeddings.weight"]


# -- selecting nothing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (
            "encoder.*weight",
            "sparsity.param_name_patterns ('encoder.*weight'): matches no parameter; the model's parameters are: "
            "embedding_layer.word_embeddings.weight",
        ),
        (["ffn", "nope"], "sparsity.param_name_patterns[1] ('nope'): matches no parameter"),
        ({"ffn": {}, "nope": {}}, 'sparsity.param_name_patterns["nope"]: matches no parameter'),
        ("bias", "sparsity.param_name_patterns ('bias'): matches only one-dimensional parameters"),
    ],
)
def test_pattern_that_selects_nothing_is_an_error(patterns, message):
    with pytest.raises(ConfigError) as info:
        _select({"sparsity": 0.3, "param_name_patterns": patterns})
    assert message in str(info.value)
    assert "transformer_decoder.layers.N.self_attn.proj_q_dense_layer.weight" in str(info.value)  # layer indices folded


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
    chosen = _select({"sparsity": 0.3, "param_name_patterns": {"ffn": {}, "ffn.0": {"sparsity": 0.5}}})
    assert {g.pattern for g in chosen.values()} == {"ffn"}
    assert "taken by an earlier pattern" in logs.text
