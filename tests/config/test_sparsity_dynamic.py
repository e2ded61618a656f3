"""The dynamic keys of a ``sparsity:`` block in every form the zoo wrote them: algorithm/type,
levels as schedules, update rules, the 2.0-2.1 ``schedule``, drop fractions, per-group settings,
the 2.x list of groups and ``{groups: [...]}``; parsed back from ``to_dict``."""

from __future__ import annotations

import pytest

from sparsetrain.config.sparsity import parse_sparsity
from sparsetrain.errors import ConfigError

COSINE = {"type": "cosine", "init": 0.3, "half_period": 3584}


def _roundtrip(block):
    config = parse_sparsity(block)
    assert parse_sparsity(config.to_dict()) == config
    return config


@pytest.mark.parametrize("key", ["type", "algorithm"])
def test_rigl_in_the_2_0_and_2_2_spellings_mean_the_same(key):
    old = {"type": "rigl", "sparsity": 0.75, "schedule": {"freq": 100, "stop": 3584}, "drop_fraction": COSINE}
    new = {"algorithm": "rigl", "sparsity": 0.75, "update": {"freq": 100, "stop": 3584}, "drop_fraction": COSINE}
    a, b = _roundtrip(old), _roundtrip(new)
    assert a.groups[0].dynamic == b.groups[0].dynamic
    d = a.groups[0].dynamic
    assert (d.algorithm, d.update.freq, d.update.stop, d.starts_sparse) == ("rigl", 100, 3584, True)
    assert a.groups[0].sparsity == 0.75


def test_schedule_as_the_2_2_alias_of_sparsity():
    config = _roundtrip({"algorithm": "gmp", "schedule": {"type": "exp", "init": 0.0, "gamma": -0.01, "final": 0.9},
                         "update": {"freq": 10}})
    d = config.groups[0].dynamic
    assert d.sparsity.kind == "exp" and d.level(100, 9) == pytest.approx(0.9 - 0.9 * 2.718281828 ** -1, rel=1e-6)


def test_defaults_every_step_and_drop_fraction_0_3():
    d = _roundtrip({"algorithm": "set", "sparsity": 0.5}).groups[0].dynamic
    assert d.update.is_update(1) and d.update.is_update(7) and d.drop(123, 4) == pytest.approx(0.3)


def test_a_rule_that_starts_later_starts_dense():
    config = _roundtrip({"algorithm": "gmp", "sparsity": {"type": "linear", "init": 0.0, "slope": 0.001},
                         "update": {"freq": 100, "start": 100}})
    assert config.groups[0].sparsity == 0.0 and not config.groups[0].dynamic.starts_sparse


def test_cycling_level_counts_the_first_mask_as_an_update():
    d = _roundtrip({"algorithm": "set", "sparsity": [0.5, 0.6, 0.7], "update": {"freq": 10}}).groups[0].dynamic
    assert d.initial_sparsity == 0.5
    assert [d.level(10 * (j + 1), j) for j in range(4)] == [0.6, 0.7, 0.5, 0.6]
    assert d.drop(10, 0) == pytest.approx(0.3)


def test_levels_are_clamped():
    d = parse_sparsity({"algorithm": "gmp", "sparsity": {"type": "linear", "init": 0.5, "slope": 0.1}}).groups[0].dynamic
    assert d.level(100, 99) == 1.0
    d = parse_sparsity({"algorithm": "gmp", "sparsity": {"type": "linear", "init": 0.5, "slope": -0.1}}).groups[0].dynamic
    assert d.level(100, 99) == 0.0


def test_per_group_dynamic_settings():
    config = _roundtrip({
        "algorithm": "rigl", "sparsity": 0.75, "update": {"freq": 100},
        "param_name_patterns": {"ffn": {"sparsity": 0.9, "drop_fraction": 0.1}, "self_attn": {"update": {"freq": 50}}},
    })
    ffn, attn = config.groups
    assert (ffn.sparsity, ffn.dynamic.update.freq, ffn.dynamic.drop(0, 0)) == (0.9, 100, 0.1)
    assert (attn.sparsity, attn.dynamic.update.freq, attn.dynamic.drop(0, 0)) == (0.75, 50, pytest.approx(0.3))


def test_the_zoo_list_of_groups_each_with_its_algorithm():
    block = [
        {"algorithm": "rigl", "sparsity": 0.75, "update": {"freq": 100}, "param_filter": "*linear_layer.weight"},
        {"algorithm": "static", "sparsity": 0.5, "param_filter": ["*proj_[qkv]_dense_layer.weight"]},
    ]
    config = _roundtrip(block)
    assert config.form == "groups" and config.type == "rigl+sideband" and config.is_dynamic
    assert [g.algorithm for g in config.groups] == ["rigl", "static"]
    assert [g.glob for g in config.groups] == ["*linear_layer.weight", "*proj_[qkv]_dense_layer.weight"]
    assert config.group_where(1) == "sparsity[1].param_filter[0] ('*proj_[qkv]_dense_layer.weight')"


def test_the_config_class_groups_form_with_params():
    config = parse_sparsity({"groups": [{"params": {"algorithm": "set", "sparsity": 0.8}, "param_filter": "*dense_layer.weight"}]})
    assert config.groups[0].algorithm == "set" and config.groups[0].sparsity == 0.8


def test_a_bare_number_is_the_level_on_the_default_heuristic():
    config = parse_sparsity(0.75)
    assert config.form == "default" and config.groups[0].sparsity == 0.75 and config.type == "sideband"


def test_erk_and_checkerboard_are_read():
    config = _roundtrip({"sparsity": 0.9, "distribution": "erk", "init_method": "checkerboard"})
    assert config.groups[0].distribution == "erk" and config.groups[0].init_method == "checkerboard"


@pytest.mark.parametrize("block, message", [
    ([{"sparsity": 0.5}, "x"], "sparsity[1]: expected a mapping of settings, got str 'x'"),
    ([{"sparsity": 0.5, "type": "foo"}], "sparsity[0].type: 'foo' is not valid"),
    ({"groups": [{"params": {"sparsity": 0.5}}], "sparsity": 0.5}, "sparsity.sparsity: with groups, every setting goes inside a group"),
    ({"algorithm": "rigl", "sparsity": 0.5, "param_name_patterns": {"ffn": {"drop_fraction": 2}}},
     'sparsity.param_name_patterns["ffn"].drop_fraction: 2 is not valid'),
    ({"sparsity": 0.5, "param_name_patterns": {"ffn": {"update": {"freq": 2}}}},
     'sparsity.param_name_patterns["ffn"].update: read only by dynamic sparsity'),
    ({"algorithm": "rigl", "sparsity": 0.5, "update": {"steps": []}}, "sparsity.update.steps: expected a non-empty list"),
    ({"algorithm": "rigl", "sparsity": 0.5, "update": {"freq": 5, "start": 10, "stop": 10}}, "sparsity.update.stop: 10 is not after start 10"),
    ({"algorithm": "rigl", "sparsity": 0.5, "update": {"every": 5}}, "sparsity.update.every: unknown key"),
    ({"algorithm": "set", "sparsity": 1.2}, "sparsity.sparsity: 1.2 is not valid"),
])
def test_bad_dynamic_blocks_one_line(block, message):
    with pytest.raises(ConfigError) as e:
        parse_sparsity(block)
    assert message in str(e.value)


@pytest.mark.parametrize("block, message", [
    ({"algorithm": "gmp", "sparsity": {"type": "linear", "init": 0.5, "slope": 0.1}, "update": {"freq": 5}},
     "sparsity.sparsity: the linear schedule reaches 1 at step 5 (update steps up to runconfig.max_steps 20)"),
    ({"algorithm": "gmp", "sparsity": {"type": "power", "init": 0.9, "beta": 2}, "update": {"freq": 5}},
     "sparsity.sparsity: the power schedule reaches 28.8 at step 5"),
    ({"algorithm": "set", "sparsity": 0.5, "param_name_patterns": {"ffn": {"sparsity": {"type": "cosine", "init": 0.5, "half_period": 4, "minimum": 1.2}}}},
     'sparsity.param_name_patterns["ffn"].sparsity: the cosine schedule reaches 1.2'),
])
def test_a_level_that_reaches_1_within_the_run_is_an_error(block, message):
    from sparsetrain.config import params_from_dict

    raw = {"train_input": {"source": "stdlib", "batch_size": 4, "max_sequence_length": 32},
           "eval_input": {"source": "stdlib", "batch_size": 4, "max_sequence_length": 32},
           "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "max_position_embeddings": 64},
           "runconfig": {"max_steps": 20}, "sparsity": block}
    with pytest.raises(ConfigError) as e:
        params_from_dict(raw)
    assert message in str(e.value)
    raw["runconfig"]["max_steps"] = 4  # the same schedule in a run that ends before it gets there
    if "linear" in str(block):
        params_from_dict(raw)
