"""Dynamic sparsity's schedules: the zoo's update rule and hyperparameter formulas, exactly."""

from __future__ import annotations

import math

import pytest

from sparsetrain.config.schedules import parse_hyper, parse_update
from sparsetrain.errors import ConfigError


@pytest.mark.parametrize("spec, step, expected", [
    (0.75, 123, 0.75),
    ({"type": "constant", "value": 0.3}, 9, 0.3),
    ({"type": "linear", "init": 0.1, "slope": 0.01}, 20, 0.1 + 0.2),
    ({"type": "exp", "init": 0.2, "gamma": -0.5}, 4, 1.0 - 0.8 * math.exp(-2.0)),
    ({"type": "exp", "init": 0.2, "gamma": -0.5, "final": 0.9}, 4, 0.9 - 0.7 * math.exp(-2.0)),
    ({"type": "power", "init": 0.5, "beta": 0.9}, 3, 0.5 * 0.729),
    ({"type": "cosine", "init": 0.3, "half_period": 3584}, 0, 0.3),
    ({"type": "cosine", "init": 0.3, "half_period": 3584}, 3584, 0.0),
    ({"type": "cosine", "init": 0.3, "half_period": 100, "minimum": 0.1}, 50, 0.2),
    ({"type": "COSINE", "init": 0.3, "half_period": 100}, 200, 0.3),
])
def test_hyperparameter_formulas(spec, step, expected):
    assert parse_hyper(spec, "sparsity.drop_fraction").value(step) == pytest.approx(expected, abs=1e-12)


def test_cycling_moves_on_at_update_steps():
    for spec in ([0.5, 0.7, 0.9], {"type": "cycling", "values": [0.5, 0.7, 0.9]}):
        h = parse_hyper(spec, "sparsity.sparsity")
        assert [h.value(0, j) for j in range(5)] == [0.5, 0.7, 0.9, 0.5, 0.7]


@pytest.mark.parametrize("spec", [
    None, {"freq": 100}, {"freq": 100, "stop": 3584}, {"freq": 7, "start": 3, "stop": 50}, {"freq": 1, "start": 5},
    {"steps": [3, 10, 11, 40]},
])
def test_update_rule_and_the_count_before_a_step(spec):
    rule = parse_update(spec, "sparsity.update")
    updates = [t for t in range(1, 400) if rule.is_update(t)]
    for step in range(0, 400, 7):
        assert rule.updates_before(step) == sum(1 for t in updates if t < step), step
    if spec == {"freq": 100, "stop": 3584}:
        assert updates == [100, 200, 300] and rule.is_update(3500) and not rule.is_update(3600)
    if spec == {"freq": 7, "start": 3, "stop": 50}:
        assert updates == [3, 10, 17, 24, 31, 38, 45]


@pytest.mark.parametrize("spec, message", [
    ({"type": "cosine", "init": 0.3}, "sparsity.drop_fraction.half_period: required by a cosine schedule (keys: init, half_period)"),
    ({"type": "cosin", "init": 0.3}, "sparsity.drop_fraction.type: 'cosin' is not valid; choose one of constant, linear, exp, power, cosine, cycling"),
    ({"type": "linear", "init": 0.3, "slop": 1}, "sparsity.drop_fraction.slop: not a key of a linear schedule; did you mean 'slope'?"),
    ({"type": "cosine", "init": 0.3, "half_period": 0}, "sparsity.drop_fraction.half_period: 0.0 must be positive"),
    ("a third", "sparsity.drop_fraction: expected a number or a schedule {type: ...}, got str"),
    ([], "sparsity.drop_fraction: expected a non-empty list of numbers"),
])
def test_bad_hyperparameter_schedules_one_line(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_hyper(spec, "sparsity.drop_fraction")
    assert str(e.value) == message


@pytest.mark.parametrize("spec, message", [
    ({"freq": 0}, "sparsity.update.freq: expected an integer >= 1, got 0"),
    ({"freq": 10, "start": 50, "stop": 20}, "sparsity.update.stop: 20 is not after start 50"),
    ({"frq": 10}, "sparsity.update.frq: unknown key; did you mean 'freq'?"),
    ({"steps": [5], "freq": 2}, "sparsity.update.freq: give steps alone, or freq/start/stop"),
    ({"steps": []}, "sparsity.update.steps: expected a non-empty list of step numbers"),
])
def test_bad_update_rules_one_line(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_update(spec, "sparsity.update")
    assert str(e.value) == message


def test_numbers_yaml_left_as_strings_and_overflow():
    """YAML 1.1 reads 1e-2 (an exponent without a dot) as a string: read as the number, as the
    rest of the params file is. A schedule run far past its range saturates (the level clamps)
    instead of overflowing."""
    assert parse_hyper({"type": "exp", "init": 0.1, "gamma": "-1e-2"}, "s").value(100) == pytest.approx(1 - 0.9 * math.exp(-1))
    assert parse_hyper("3e-1", "s").value(0) == pytest.approx(0.3)
    assert parse_hyper({"type": "exp", "init": 0.1, "gamma": 1000}, "s").value(5) == -math.inf
    assert parse_hyper({"type": "power", "init": 0.5, "beta": 1.01}, "s").value(100000) == math.inf
    assert parse_hyper({"type": "power", "init": 0.0, "beta": 1.01}, "s").value(100000) == 0.0
    assert parse_update({"steps": [5, 5, 3]}, "u").steps == (3, 5)
