"""``optim/packed.py``: the PackedOptimizer, whose state for sparsified weights holds their kept
entries only. Against torch's own AdamW / Adam / SGD with the generic sparsifier: the same
losses, weights and state dicts over 50 steps, the SPEC §3 invariant after every step, torch's
state-dict layout (so NaN checkpoints are the same and move both ways), new masks repacking the
state, the memory it saves, what it refuses; an optimizer without ``set_masks`` keeps the
sparsifier's generic path."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.optim.packed import PackedOptimizer
from sparsetrain.sparsity.sparsifier import sparsify
from tests.optim.helpers import (
    KINDS,
    SPARSITY,
    UNIFORM_75,
    VOCAB,
    Run,
    assert_state_close,
    nan_checkpoint,
    resume_from,
    small_gpt,
    violations,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", KINDS)
def test_fifty_steps_match_torch(kind):
    dense, packed = Run(kind, packed=False), Run(kind, packed=True)
    for step in range(50):
        torch.testing.assert_close(packed.step(step), dense.step(step), msg=f"loss at step {step}")
        assert violations(packed) == [], f"step {step}"
    for (name, a), b in zip(dense.model.named_parameters(), packed.model.parameters()):
        torch.testing.assert_close(b, a, msg=name)
    assert_state_close(packed.named_state(), dense.named_state())
    sd_packed, sd_dense = packed.optimizer.state_dict(), dense.optimizer.state_dict()
    assert sd_packed["param_groups"] == sd_dense["param_groups"]  # torch's keys and values
    # In memory, the masked weights' state is packed: 1-D, one entry per kept weight.
    params = dict(packed.model.named_parameters())
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    for name, mask in packed.sparsifier.masks.items():
        assert packed.optimizer.state[params[name]][key].shape == (int(mask.sum()),)
    # Unmasked parameters keep torch's dense state.
    norm = "transformer_decoder.norm.weight"
    assert packed.optimizer.state[params[norm]][key].shape == params[norm].shape


@pytest.mark.parametrize("kind", KINDS)
def test_state_bytes_at_75_percent(kind):
    packed = Run(kind, packed=True, block=UNIFORM_75)
    dense = Run(kind, packed=False, block=UNIFORM_75)
    for step in range(2):
        packed.step(step), dense.step(step)
    used, equivalent = packed.optimizer.state_bytes(), packed.optimizer.dense_equivalent_bytes()
    assert used["masked"] <= 0.3 * equivalent["masked"], (used, equivalent)
    assert used["dense"] == equivalent["dense"] > 0
    assert used["total"] == used["masked"] + used["dense"]
    # The dense equivalent is what torch's optimizer holds for the same parameters.
    torch_bytes = sum(
        v.numel() * v.element_size() for s in dense.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    assert equivalent["total"] == torch_bytes


@pytest.mark.parametrize("load_first", [True, False], ids=["load-then-sparsify", "sparsify-then-load"])
@pytest.mark.parametrize("direction", ["torch-to-packed", "packed-to-torch"])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_cross_load(kind, direction, load_first):
    source_packed = direction == "packed-to-torch"
    source = Run(kind, packed=source_packed)
    for step in range(10):
        source.step(step)
    resumed = resume_from(kind, not source_packed, nan_checkpoint(source), load_first)
    assert violations(resumed) == []
    if not source_packed:
        p = resumed.model.get_parameter("transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight")
        key = "momentum_buffer" if kind == "sgd" else "exp_avg"
        assert resumed.optimizer.state[p][key].ndim == 1  # packed on load or on set_masks
    for step in range(10, 20):
        torch.testing.assert_close(resumed.step(step), source.step(step), msg=f"loss at step {step}")
        assert violations(resumed) == []
    assert_state_close(resumed.named_state(), source.named_state())


@pytest.mark.parametrize("kind", KINDS)
def test_nan_checkpoint_is_the_same_as_torchs(kind):
    dense, packed = Run(kind, packed=False), Run(kind, packed=True)
    for step in range(5):
        dense.step(step), packed.step(step)
    a = nan_checkpoint(dense)["optimizer"]
    b = nan_checkpoint(packed)["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    nans = 0
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        for key, value in a["state"][index].items():
            torch.testing.assert_close(b["state"][index][key], value, equal_nan=True)
            nans += int(torch.isnan(value).sum()) if value.is_floating_point() else 0
    assert nans > 0


def test_optimizer_state_loaded_before_masks_is_packed_by_set_masks():
    source = Run("adamw", packed=False)
    for step in range(3):
        source.step(step)
    run = Run("adamw", packed=True, sparsify_now=False)
    run.model.load_state_dict(source.model.state_dict())
    run.optimizer.load_state_dict(source.optimizer.state_dict())
    p = run.model.get_parameter("transformer_decoder.layers.1.ffn.ffn.1.linear_layer.weight")
    assert run.optimizer.state[p]["exp_avg"].shape == p.shape  # no masks yet: dense
    run.sparsifier = sparsify(run.model, SPARSITY, run.optimizer, masks=dict(source.sparsifier.masks))
    assert run.optimizer.state[p]["exp_avg"].ndim == 1
    assert_state_close(run.named_state(), source.named_state())


def test_new_masks_repack_and_detach_returns_to_dense_state():
    run = Run("adamw", packed=True)
    for step in range(3):
        run.step(step)
    name = "transformer_decoder.layers.0.self_attn.proj_output_dense_layer.weight"
    p = run.model.get_parameter(name)
    old = run.sparsifier.masks[name]
    before = run.named_state()[name]["exp_avg"].clone()
    state = run.sparsifier.state_dict()
    new = torch.roll(old, 1, dims=1)  # as many pruned, other places
    state["masks"] = {**state["masks"], name: new}
    run.sparsifier.load_state_dict(state)
    assert run.optimizer.state[p]["exp_avg"].shape == (int(new.sum()),)
    after = run.named_state()[name]["exp_avg"]
    torch.testing.assert_close(after, before * (old & new))  # kept where both keep, else 0
    assert violations(run) == []
    run.step(3)
    assert violations(run) == []
    run.sparsifier.detach()
    assert run.optimizer.state[p]["exp_avg"].shape == p.shape
    run.step(4)
    assert bool((p.detach()[~new] != 0).any())  # trains dense now


def test_sgd_without_momentum_keeps_no_state_like_torch():
    run = Run("sgd", packed=True, momentum=0.0, nesterov=False)
    dense = Run("sgd", packed=False, momentum=0.0, nesterov=False)
    for step in range(3):
        torch.testing.assert_close(run.step(step), dense.step(step))
    assert run.optimizer.state_dict()["state"] == {} == dense.optimizer.state_dict()["state"]


def test_rejections():
    model = small_gpt()
    with pytest.raises(ValueError, match="kind"):
        PackedOptimizer(model.parameters(), kind="lion")
    with pytest.raises(ValueError, match="Nesterov"):
        PackedOptimizer(model.parameters(), kind="sgd", nesterov=True)
    adamw = PackedOptimizer(model.parameters(), kind="adamw")
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="another kind"):
        adamw.load_state_dict(sgd_state)
    amsgrad = PackedOptimizer(model.parameters(), kind="adam")
    amsgrad.param_groups[0]["amsgrad"] = True
    sparsify(model, UNIFORM_75, amsgrad)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    with pytest.raises(NotImplementedError, match="amsgrad"):
        amsgrad.step()


def test_other_optimizers_keep_the_generic_path():
    """An optimizer without set_masks: dense state, zeroed by the sparsifier's post-step pass."""
    model = small_gpt()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.1)
    sparsifier = sparsify(model, SPARSITY, optimizer)
    for step in range(3):
        tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()).backward()
        optimizer.step()
    for name, mask in sparsifier.masks.items():
        p = model.get_parameter(name)
        assert optimizer.state[p]["square_avg"].shape == p.shape
        assert not optimizer.state[p]["square_avg"][~mask].any() and not p[~mask].any()
