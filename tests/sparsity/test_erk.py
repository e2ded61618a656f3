"""``sparsity/erk.py``: ERK per-tensor sparsities -- densities proportional to sum/prod of the shape,
the dense cap, the exact global pruned count, against a float oracle of the RigL procedure."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetrain.sparsity.erk import erk_sparsities
from sparsetrain.sparsity.masks import num_pruned


def _pruned(shapes, out):
    return {name: num_pruned(math.prod(shapes[name]), s) for name, s in out.items()}


def _total_pruned(shapes, out):
    return sum(_pruned(shapes, out).values())


def _oracle_densities(shapes, sparsity):
    """The RigL procedure in floats: solve eps, make the largest-ratio tensors dense, repeat."""
    numel = {k: math.prod(v) for k, v in shapes.items()}
    raw = {k: sum(v) / numel[k] for k, v in shapes.items()}
    dense = set()
    while True:
        live = [k for k in shapes if k not in dense]
        rhs = (1 - sparsity) * sum(numel.values()) - sum(numel[k] for k in dense)
        eps = rhs / sum(raw[k] * numel[k] for k in live)
        top = max(raw[k] for k in live)
        if eps * top <= 1 + 1e-12 or len(live) == 1:
            return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}
        dense |= {k for k in live if raw[k] == top}


GPT_BLOCK = {
    "attn.qkv": (2304, 768),
    "attn.proj": (768, 768),
    "mlp.fc": (3072, 768),
    "mlp.proj": (768, 3072),
}
TOY = {"a": (64, 32), "b": (128, 128), "c": (16, 48), "d": (256, 64)}


def test_densities_are_proportional_to_sum_over_prod():
    shapes = TOY
    out = erk_sparsities(shapes, 0.8)
    assert all(s > 0 for s in out.values())  # no dense cap at this sparsity
    ratio = {k: (n_out + n_in) / (n_out * n_in) for k, (n_out, n_in) in shapes.items()}
    eps = {k: (1 - out[k]) / ratio[k] for k in shapes}  # the common factor, per tensor
    for k, (n_out, n_in) in shapes.items():
        # each density is off its ideal by less than one entry in numel
        assert eps[k] == pytest.approx(eps["b"], abs=1.0 / (n_out * n_in) / ratio[k] + 1e-12)


def test_matches_the_float_oracle_within_one_entry():
    shapes = {**GPT_BLOCK, "tiny": (4, 3), "head": (50304, 768), "bias_like": (768,)}
    for sparsity in (0.5, 0.75, 0.9, 0.99):
        out = erk_sparsities(shapes, sparsity)
        oracle = _oracle_densities(shapes, sparsity)
        for k, shape in shapes.items():
            assert 1 - out[k] == pytest.approx(oracle[k], abs=1.0 / math.prod(shape) + 1e-9), (sparsity, k)


def test_larger_layers_get_sparser():
    out = erk_sparsities(GPT_BLOCK, 0.9)
    assert out["attn.proj"] < out["attn.qkv"] < out["mlp.fc"]
    assert out["mlp.fc"] == out["mlp.proj"]  # same numel and same sum: same count


def test_tiny_layer_next_to_huge_ones_is_dense():
    shapes = {"tiny": (3, 2), "huge1": (4096, 4096), "huge2": (4096, 1024)}
    out = erk_sparsities(shapes, 0.5)
    assert out["tiny"] == 0.0
    assert out["huge1"] > 0.5 > out["huge2"] > 0.0  # the larger one sparser
    assert _total_pruned(shapes, out) == num_pruned(4096 * 4096 + 4096 * 1024 + 6, 0.5)


def test_dense_cap_repeats_until_no_density_exceeds_one():
    # at 10% sparsity the first solve pushes both small tensors over 1: each cap round removes one
    shapes = {"s1": (8, 8), "s2": (32, 32), "big": (2048, 2048)}
    out = erk_sparsities(shapes, 0.1)
    assert out["s1"] == 0.0 and out["s2"] == 0.0 and out["big"] > 0.1
    assert all(0.0 <= s < 1.0 for s in out.values())


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.7, 0.75, 0.9, 0.95, 0.999])
@pytest.mark.parametrize(
    "shapes",
    [
        {"a": (7, 13), "b": (31, 3), "c": (97, 101), "d": (1, 5)},
        {"x": (3,), "y": (5, 7, 11), "z": (2, 3, 5, 7)},
        GPT_BLOCK,
        {"only": (17, 19)},
    ],
)
def test_global_count_is_exact(shapes, sparsity):
    out = erk_sparsities(shapes, sparsity)
    assert list(out) == sorted(shapes)
    total = sum(math.prod(s) for s in shapes.values())
    assert _total_pruned(shapes, out) == num_pruned(total, sparsity)
    for k, s in out.items():
        assert 0.0 <= s <= 1.0
        assert num_pruned(math.prod(shapes[k]), s) == round(s * math.prod(shapes[k]))  # s_i = pruned_i / numel_i


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=3),
        st.lists(st.integers(1, 300), min_size=1, max_size=3),
        min_size=1,
        max_size=6,
    ),
    st.floats(0.0, 0.999),
)
def test_global_count_is_exact_for_any_shapes(shapes, sparsity):
    out = erk_sparsities(shapes, sparsity)
    total = sum(math.prod(s) for s in shapes.values())
    assert _total_pruned(shapes, out) == num_pruned(total, sparsity)
    assert all(0.0 <= s <= 1.0 for s in out.values())


def test_zero_sparsity_is_all_dense():
    assert erk_sparsities({"a": (7, 3), "b": (100, 100), "c": (5,)}, 0.0) == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_single_tensor_gets_the_global_sparsity():
    assert erk_sparsities({"w": (40, 25)}, 0.75) == {"w": 0.75}


def test_one_and_three_d_shapes_use_sum_and_prod_of_all_dims():
    shapes = {"vec": (4096,), "conv": (64, 32, 3, 3), "cube": (16, 16, 16), "mat": (512, 512)}
    out = erk_sparsities(shapes, 0.9)
    oracle = _oracle_densities(shapes, 0.9)
    for k, shape in shapes.items():
        assert 1 - out[k] == pytest.approx(oracle[k], abs=1.0 / math.prod(shape) + 1e-9)
    # a (4096,) vector has sum/prod = 1: it is the densest possible, so capped dense
    assert out["vec"] == 0.0
    # the 3-D cube's ratio is 48 / 4096, not that of any 2-D view of it
    live = {k for k in shapes if out[k] > 0}
    assert {"cube", "mat", "conv"} <= live
    assert (1 - out["cube"]) / (1 - out["mat"]) == pytest.approx((48 / 4096) / (1024 / 512**2), rel=1e-2)


def test_is_deterministic_and_independent_of_input_order():
    shapes = {"b": (8, 8), "a": (8, 8), "c": (8, 8)}  # equal ratios: the leftovers go by name
    out = erk_sparsities(shapes, 0.5)
    assert out == erk_sparsities(dict(reversed(list(shapes.items()))), 0.5)
    assert list(out) == ["a", "b", "c"]
    shapes = {"b": (3, 3), "a": (3, 3)}  # 18 entries, 9 pruned: 5 + 4, the extra one to "a"
    assert _pruned(shapes, erk_sparsities(shapes, 0.5)) == {"a": 5, "b": 4}


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_sparsity_raises(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        erk_sparsities({"w": (4, 4)}, sparsity)


@pytest.mark.parametrize("shape", [(), (0, 4), (4, -1), (2.5, 4)])
def test_bad_shape_raises(shape):
    with pytest.raises(ValueError, match="'w'"):
        erk_sparsities({"w": shape}, 0.5)


def test_empty_input_raises():
    with pytest.raises(ValueError, match="at least one"):
        erk_sparsities({}, 0.5)
