"""``sparsity/sparsifier.py``: masks bound to a model and its optimizers, and the SPEC §3 invariant
(pruned weights, gradients and same-shape optimizer state exactly zero) after every step of every
torch optimizer; creation, no block (dense), state dicts, statistics, rebinding, gradients written
outside backward. On the toy GPT of ``tests/helpers.py``."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.sparsity.masks import num_pruned, random_mask, topk_mask
from sparsetrain.sparsity.sparsifier import Sparsifier, sparsify
from tests.helpers import BLOCK_MATRICES, QKV_KINDS, TOY_CONTEXT, TOY_SPARSITY, TOY_VOCAB, TOY_WIDTH, toy_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, WIDTH, CONTEXT = TOY_VOCAB, TOY_WIDTH, TOY_CONTEXT
BLOCK = TOY_SPARSITY
MATRICES = BLOCK_MATRICES


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    idx = torch.randint(0, VOCAB, (3, CONTEXT), generator=generator)
    logits = model(idx)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _violations(sparsifier: Sparsifier, optimizer: torch.optim.Optimizer) -> list[str]:
    """Every place where a pruned entry is not exactly zero: weight, grad, same-shape state."""
    params = dict(sparsifier.model.named_parameters())
    found = []
    for name, mask in sparsifier.masks.items():
        p = params[name]
        tensors = {"weight": p.detach(), "grad": p.grad}
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                tensors[key] = value
        for key, value in tensors.items():
            if value is not None and bool((value[~mask] != 0).any()):
                found.append(f"{name}:{key}")
    return found


OPTIMIZERS = {
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
    "adam_amsgrad_foreach": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, weight_decay=0.1, initial_accumulator_value=0.1),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.01, weight_decay=0.1),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=0.01, weight_decay=0.1),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0, weight_decay=0.1),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.01, weight_decay=0.1, t0=2),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.01),
}
if hasattr(torch.optim, "Adafactor"):
    OPTIMIZERS["adafactor"] = lambda ps: torch.optim.Adafactor(ps, lr=0.01, weight_decay=0.1)
if hasattr(torch.optim, "Muon"):
    # Muon orthogonalizes the momentum: a dense update even where the gradient is zero.
    OPTIMIZERS["muon"] = lambda ps: torch.optim.Muon([p for p in ps if p.ndim == 2], lr=0.02, weight_decay=0.1)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_invariant_after_every_step(make, when):
    model = toy_gpt()
    if when == "before":
        sparsifier = sparsify(model, BLOCK)
        optimizer = make(list(model.parameters()))
        sparsifier.attach(optimizer)
    else:
        optimizer = make(list(model.parameters()))
        sparsifier = sparsify(model, BLOCK, optimizer)
    assert _violations(sparsifier, optimizer) == []
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(20):
        _train_step(model, optimizer, step)
        assert _violations(sparsifier, optimizer) == [], f"step {step}"
    for name, mask in sparsifier.masks.items():
        moved = model.get_parameter(name).detach()[mask] != start[name][mask]
        assert bool(moved.any()), f"{name} did not train"


def test_without_hooks_pruned_weights_come_back():
    """The control for the invariant test: the check does catch revived weights."""
    model = toy_gpt()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    sparsifier = sparsify(model, BLOCK, optimizer)
    sparsifier.detach()
    for step in range(3):
        _train_step(model, optimizer, step)
    assert any(v.endswith(":weight") for v in _violations(sparsifier, optimizer))


def test_dense_optimizer_state_cannot_revive_pruned_weights():
    model = toy_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in range(3):  # dense warm-up: momentum everywhere
        _train_step(model, optimizer, step)
    sparsifier = sparsify(model, BLOCK, optimizer)
    assert _violations(sparsifier, optimizer) == []  # attach cleared the momentum at pruned entries
    _train_step(model, optimizer, 3)
    assert _violations(sparsifier, optimizer) == []


def test_pruned_gradients_are_zero_right_after_backward():
    """So gradient clipping measures the sparse gradient, as on the reference hardware."""
    model = toy_gpt()
    sparsifier = sparsify(model, BLOCK)
    idx = torch.randint(0, VOCAB, (2, CONTEXT))
    model(idx).square().mean().backward()
    for name, mask in sparsifier.masks.items():
        grad = model.get_parameter(name).grad
        assert bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).any())


def test_creation_zeroes_exactly_the_drawn_masks():
    model = toy_gpt()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sparsifier = sparsify(model, BLOCK)
    assert list(sparsifier.masks) == MATRICES + ["lm_head.weight"]
    for name, mask in sparsifier.masks.items():
        group = sparsifier.settings[name]
        weight = model.get_parameter(name).detach()
        if group.init_method == "topk":
            assert torch.equal(mask, topk_mask(before[name], group.sparsity))
        else:
            assert torch.equal(mask, random_mask(name, weight.shape, group.sparsity, 3))
        assert int((~mask).sum()) == num_pruned(mask.numel(), group.sparsity)
        assert bool((weight[~mask] == 0).all())
        assert torch.equal(weight[mask], before[name][mask])
    embeddings = model.embedding_layer.word_embeddings.weight
    assert torch.equal(embeddings, before["embedding_layer.word_embeddings.weight"])


def test_no_block_means_dense():
    model = toy_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sparsify(model, None, optimizer)
    assert sparsifier.masks == {} and sparsifier.stats() == []
    _train_step(model, optimizer, 0)
    assert all(bool((p != 0).all()) for p in model.parameters() if p.ndim > 1)


def test_no_block_with_given_masks_is_dense_fine_tuning(logs):
    first = sparsify(toy_gpt(), BLOCK)
    with logs.at_level(logging.INFO):
        sparsifier = sparsify(toy_gpt(), None, masks=first.masks)
    assert sparsifier.masks == {}
    assert "train dense (dense fine-tuning)" in logs.text


def test_bad_block_raises_config_error():
    with pytest.raises(ConfigError, match="sparsity.init_method"):
        sparsify(toy_gpt(), {"sparsity": 0.5, "init_method": "magnitude"})
    with pytest.raises(ConfigError, match="matches no parameter"):
        sparsify(toy_gpt(), {"sparsity": 0.5, "param_name_patterns": "encoder"})


def test_state_dict_round_trip_and_mismatch():
    first = sparsify(toy_gpt(seed=0), BLOCK)
    state = first.state_dict()
    assert state["config"]["param_name_patterns"]["ffn"]["init_method"] == "random"
    model = toy_gpt(seed=1)
    second = sparsify(model, BLOCK)
    second.load_state_dict(state)
    for name, mask in first.masks.items():
        assert torch.equal(second.masks[name], mask)
        assert bool((model.get_parameter(name).detach()[~mask] == 0).all())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    second.attach(optimizer)
    _train_step(model, optimizer, 0)
    assert _violations(second, optimizer) == []
    with pytest.raises(CheckpointError, match="missing: .*ffn"):
        sparsify(toy_gpt(), {"sparsity": 0.5, "param_name_patterns": "self_attn"}).load_state_dict(state)
    with pytest.raises(CheckpointError, match="no 'masks'"):
        second.load_state_dict({})


def test_stats():
    model = toy_gpt()
    sparsifier = sparsify(model, BLOCK)
    with torch.no_grad():
        model.transformer_decoder.layers[0].ffn.ffn[0].linear_layer.weight[0, :] = 0  # some kept entries happen to be zero too
    rows = {row["name"]: row for row in sparsifier.stats()}
    row = rows["transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"]
    assert row["group"] == "ffn" and row["target"] == 0.75 and row["numel"] == 4 * WIDTH * WIDTH
    assert row["kept"] == row["numel"] - num_pruned(row["numel"], 0.75)
    assert row["mask"] == pytest.approx(0.75)
    assert row["actual"] > row["mask"]
    for kind in QKV_KINDS:
        assert rows[f"transformer_decoder.layers.0.{kind}"]["actual"] == pytest.approx(0.5)
    assert "tensors" in sparsifier.summary()


def test_group_stats_and_pruned_fractions():
    model = toy_gpt()
    sparsifier = sparsify(model, BLOCK)
    groups = {g["group"]: g for g in sparsifier.group_stats()}
    assert list(groups) == ["ffn", "self_attn", "lm_head"]
    assert groups["ffn"]["tensors"] == 4 and groups["ffn"]["target"] == 0.75
    assert groups["ffn"]["numel"] == 2 * 2 * 4 * WIDTH * WIDTH
    assert groups["ffn"]["mask"] == pytest.approx(0.75) and groups["ffn"]["actual"] == pytest.approx(0.75)
    assert groups["self_attn"]["tensors"] == 2 * 4  # q, k, v and the output projection of 2 layers
    fractions = sparsifier.pruned_fractions()
    assert fractions["lm_head.weight"] == pytest.approx(num_pruned(VOCAB * WIDTH, 0.3) / (VOCAB * WIDTH))
    assert set(fractions) == set(sparsifier.masks)


def test_mask_gradients_on_demand():
    model = toy_gpt()
    sparsifier = sparsify(model, BLOCK)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    sparsifier.mask_gradients()
    for name, mask in sparsifier.masks.items():
        assert torch.equal(model.get_parameter(name).grad, mask.float())


def test_rebinds_to_replaced_parameters_at_attach():
    model = toy_gpt()
    sparsifier = sparsify(model, BLOCK)
    fc = model.transformer_decoder.layers[0].ffn.ffn[0].linear_layer
    fc.weight = nn.Parameter(torch.randn_like(fc.weight))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier.attach(optimizer)
    assert _violations(sparsifier, optimizer) == []
    _train_step(model, optimizer, 0)
    assert _violations(sparsifier, optimizer) == []


def test_parameters_without_gradients_and_frozen_ones():
    model = toy_gpt()
    model.transformer_decoder.layers[1].ffn.ffn[0].linear_layer.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)
    sparsifier = sparsify(model, BLOCK, optimizer)
    optimizer.step()  # no gradients at all
    for step in range(2):
        _train_step(model, optimizer, step)
    assert _violations(sparsifier, optimizer) == []


def test_apply_clears_nan_and_attach_twice_is_harmless():
    model = toy_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sparsify(model, BLOCK, optimizer)
    sparsifier.attach(optimizer)
    mask = sparsifier.masks["lm_head.weight"]
    with torch.no_grad():
        model.lm_head.weight[~mask] = float("nan")
    sparsifier.apply()
    assert bool((model.lm_head.weight[~mask] == 0).all())
    assert len(sparsifier._step_handles) == 2


def test_gradients_written_outside_backward_are_masked_before_the_step():
    """E.g. a DDP reducer copying reduced gradients back: nothing pruned may leak into a step
    (Muon orthogonalizes the whole matrix, so a leak would change the kept entries too)."""
    make = OPTIMIZERS.get("muon", OPTIMIZERS["adam"])
    runs = []
    for premask in (False, True):
        model = toy_gpt()
        optimizer = make(list(model.parameters()))
        sparsifier = sparsify(model, BLOCK, optimizer)
        generator = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            grad = torch.randn(p.shape, generator=generator)
            if premask and name in sparsifier.masks:
                grad = grad * sparsifier.masks[name]
            p.grad = grad
        optimizer.step()
        assert _violations(sparsifier, optimizer) == []
        runs.append({name: p.detach().clone() for name, p in model.named_parameters()})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_gradients_changed_in_place_after_backward_are_masked_again():
    model = toy_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sparsify(model, BLOCK, optimizer)
    model(torch.randint(0, VOCAB, (2, CONTEXT))).square().mean().backward()
    for p in model.parameters():
        p.grad.add_(1.0)  # same tensor the grad hook masked, changed since
    optimizer.step()
    assert _violations(sparsifier, optimizer) == []
