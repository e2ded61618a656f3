"""``config/fields.py``: how a field's value is read (the type checks, ranges and unknown keys are
named in ``test_params.py::test_bad_values_name_the_key``)."""

from __future__ import annotations

import pytest

from sparsetrain.config import params_from_dict


def test_yaml_number_without_dot_is_a_number():
    p = params_from_dict({"optimizer": {"learning_rate": "1e-3"}})
    assert p.optimizer.learning_rate == pytest.approx(1e-3)
