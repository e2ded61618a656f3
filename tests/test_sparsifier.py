"""The sparsifier: masks bound to a model, and the SPEC §3 invariant after every optimizer step."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.sparsity.masks import num_pruned, random_mask, topk_mask
from sparsetrain.sparsity.sparsifier import Sparsifier, sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, WIDTH, CONTEXT = 13, 8, 6


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(3 * d, d)
        self.norm_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(d, 4 * d)
        self.mlp.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.proj(torch.tanh(self.attn.qkv(self.norm_1(x))))
        return x + self.mlp.proj(torch.relu(self.mlp.fc(self.norm_2(x))))


class TinyGPT(nn.Module):
    """GPT-shaped enough for sparsity: same parameter names, no real attention."""

    def __init__(self, tied: bool = False, n_layer: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, WIDTH)
        self.embed_positions = nn.Embedding(CONTEXT, WIDTH)
        self.layers = nn.ModuleList(_Block(WIDTH) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx) + self.embed_positions(torch.arange(idx.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm_f(x))


BLOCK = {
    "sparsity": 0.5,
    "seed": 3,
    "param_name_patterns": {
        "mlp": {"sparsity": 0.75, "init_method": "random"},
        "attn": {},
        "lm_head": {"sparsity": 0.3},
    },
}
MATRICES = [
    f"layers.{i}.{s}"
    for i in range(2)
    for s in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")
]


def _model(seed: int = 0, **kwargs) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(**kwargs)


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
    model = _model()
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
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    sparsifier = sparsify(model, BLOCK, optimizer)
    sparsifier.detach()
    for step in range(3):
        _train_step(model, optimizer, step)
    assert any(v.endswith(":weight") for v in _violations(sparsifier, optimizer))


def test_dense_optimizer_state_cannot_revive_pruned_weights():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in range(3):  # dense warm-up: momentum everywhere
        _train_step(model, optimizer, step)
    sparsifier = sparsify(model, BLOCK, optimizer)
    assert _violations(sparsifier, optimizer) == []  # attach cleared the momentum at pruned entries
    _train_step(model, optimizer, 3)
    assert _violations(sparsifier, optimizer) == []


def test_pruned_gradients_are_zero_right_after_backward():
    """So gradient clipping measures the sparse gradient, as on the reference hardware."""
    model = _model()
    sparsifier = sparsify(model, BLOCK)
    idx = torch.randint(0, VOCAB, (2, CONTEXT))
    model(idx).square().mean().backward()
    for name, mask in sparsifier.masks.items():
        grad = model.get_parameter(name).grad
        assert bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).any())


def test_creation_zeroes_exactly_the_drawn_masks():
    model = _model()
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
    assert torch.equal(model.embed_tokens.weight, before["embed_tokens.weight"])


def test_default_heuristic_on_tied_and_untied_models():
    for tied in (False, True):
        sparsifier = sparsify(_model(tied=tied), {"sparsity": 0.5})
        assert list(sparsifier.masks) == MATRICES


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


def test_no_block_means_dense():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sparsify(model, None, optimizer)
    assert sparsifier.masks == {} and sparsifier.stats() == []
    _train_step(model, optimizer, 0)
    assert all(bool((p != 0).all()) for p in model.parameters() if p.ndim > 1)


def test_no_block_with_given_masks_is_dense_fine_tuning(logs):
    first = sparsify(_model(), BLOCK)
    with logs.at_level(logging.INFO):
        sparsifier = sparsify(_model(), None, masks=first.masks)
    assert sparsifier.masks == {}
    assert "train dense (dense fine-tuning)" in logs.text


def test_bad_block_raises_config_error():
    with pytest.raises(ConfigError, match="sparsity.init_method"):
        sparsify(_model(), {"sparsity": 0.5, "init_method": "magnitude"})
    with pytest.raises(ConfigError, match="matches no parameter"):
        sparsify(_model(), {"sparsity": 0.5, "param_name_patterns": "decoder"})


def test_given_masks_are_kept_not_redrawn():
    first = sparsify(_model(seed=0), BLOCK)
    model = _model(seed=1)  # other weights: topk would choose other masks
    sparsifier = sparsify(model, BLOCK, masks=first.masks)
    for name, mask in first.masks.items():
        assert torch.equal(sparsifier.masks[name], mask)
        assert bool((model.get_parameter(name).detach()[~mask] == 0).all())
    assert not torch.equal(topk_mask(_model(seed=1).lm_head.weight, 0.3), first.masks["lm_head.weight"])


def test_given_masks_with_sparsity_zero_make_the_weights_dense():
    first = sparsify(_model(), BLOCK)
    sparsifier = sparsify(_model(), {"sparsity": 0.0}, masks={n: first.masks[n] for n in MATRICES})
    assert all(bool(mask.all()) for mask in sparsifier.masks.values())


def test_given_masks_at_another_sparsity_are_redrawn(logs):
    first = sparsify(_model(), {"sparsity": 0.5})
    with logs.at_level(logging.WARNING):
        sparsifier = sparsify(_model(), {"sparsity": 0.75}, masks=first.masks)
    assert "drawing a new topk mask" in logs.text
    for name, mask in sparsifier.masks.items():
        assert int((~mask).sum()) == num_pruned(mask.numel(), 0.75)
        assert bool((~first.masks[name] <= ~mask).all())  # old zeros are pruned first


def test_given_masks_for_unselected_parameters_warn(logs):
    first = sparsify(_model(), {"sparsity": 0.5})
    with logs.at_level(logging.WARNING):
        sparsifier = sparsify(_model(), {"sparsity": 0.5, "param_name_patterns": "mlp"}, masks=first.masks)
    assert "they train dense" in logs.text
    assert all("mlp" in name for name in sparsifier.masks)


def test_given_masks_that_do_not_fit_the_model():
    model = _model()
    with pytest.raises(CheckpointError, match="'decoder.weight'"):
        sparsify(model, BLOCK, masks={"decoder.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match=r"'layers.0.mlp.fc.weight': shape \(2, 2\)"):
        sparsify(model, BLOCK, masks={"layers.0.mlp.fc.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_from_zeros_takes_the_existing_zeros(logs):
    model = _model()
    with torch.no_grad():
        model.layers[0].mlp.fc.weight[:, ::2] = 0
    with logs.at_level(logging.WARNING):
        sparsifier = sparsify(model, {"sparsity": 0.5, "init_method": "from_zeros", "param_name_patterns": "mlp.fc"})
    assert torch.equal(sparsifier.masks["layers.0.mlp.fc.weight"], model.layers[0].mlp.fc.weight != 0)
    assert bool(sparsifier.masks["layers.1.mlp.fc.weight"].all())
    assert "layers.1.mlp.fc.weight 0.0%" in logs.text


def test_state_dict_round_trip_and_mismatch():
    first = sparsify(_model(seed=0), BLOCK)
    state = first.state_dict()
    assert state["config"]["param_name_patterns"]["mlp"]["init_method"] == "random"
    model = _model(seed=1)
    second = sparsify(model, BLOCK)
    second.load_state_dict(state)
    for name, mask in first.masks.items():
        assert torch.equal(second.masks[name], mask)
        assert bool((model.get_parameter(name).detach()[~mask] == 0).all())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    second.attach(optimizer)
    _train_step(model, optimizer, 0)
    assert _violations(second, optimizer) == []
    with pytest.raises(CheckpointError, match="missing: .*mlp"):
        sparsify(_model(), {"sparsity": 0.5, "param_name_patterns": "attn"}).load_state_dict(state)
    with pytest.raises(CheckpointError, match="no 'masks'"):
        second.load_state_dict({})


def test_stats():
    model = _model()
    sparsifier = sparsify(model, BLOCK)
    with torch.no_grad():
        model.layers[0].mlp.fc.weight[0, :] = 0  # some kept entries happen to be zero too
    rows = {row["name"]: row for row in sparsifier.stats()}
    row = rows["layers.0.mlp.fc.weight"]
    assert row["group"] == "mlp" and row["target"] == 0.75 and row["numel"] == 4 * WIDTH * WIDTH
    assert row["kept"] == row["numel"] - num_pruned(row["numel"], 0.75)
    assert row["mask"] == pytest.approx(0.75)
    assert row["actual"] > row["mask"]
    assert rows["layers.0.attn.qkv.weight"]["actual"] == pytest.approx(0.5)
    assert "tensors" in sparsifier.summary()


def test_group_stats_and_pruned_fractions():
    model = _model()
    sparsifier = sparsify(model, BLOCK)
    groups = {g["group"]: g for g in sparsifier.group_stats()}
    assert list(groups) == ["mlp", "attn", "lm_head"]
    assert groups["mlp"]["tensors"] == 4 and groups["mlp"]["target"] == 0.75
    assert groups["mlp"]["numel"] == 2 * 2 * 4 * WIDTH * WIDTH
    assert groups["mlp"]["mask"] == pytest.approx(0.75) and groups["mlp"]["actual"] == pytest.approx(0.75)
    fractions = sparsifier.pruned_fractions()
    assert fractions["lm_head.weight"] == pytest.approx(num_pruned(VOCAB * WIDTH, 0.3) / (VOCAB * WIDTH))
    assert set(fractions) == set(sparsifier.masks)


def test_mask_gradients_on_demand():
    model = _model()
    sparsifier = sparsify(model, BLOCK)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    sparsifier.mask_gradients()
    for name, mask in sparsifier.masks.items():
        assert torch.equal(model.get_parameter(name).grad, mask.float())


def test_rebinds_to_replaced_parameters_at_attach():
    model = _model()
    sparsifier = sparsify(model, BLOCK)
    fc = model.layers[0].mlp.fc
    fc.weight = nn.Parameter(torch.randn_like(fc.weight))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier.attach(optimizer)
    assert _violations(sparsifier, optimizer) == []
    _train_step(model, optimizer, 0)
    assert _violations(sparsifier, optimizer) == []


def test_parameters_without_gradients_and_frozen_ones():
    model = _model()
    model.layers[1].mlp.fc.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)
    sparsifier = sparsify(model, BLOCK, optimizer)
    optimizer.step()  # no gradients at all
    for step in range(2):
        _train_step(model, optimizer, step)
    assert _violations(sparsifier, optimizer) == []


def test_apply_clears_nan_and_attach_twice_is_harmless():
    model = _model()
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
        model = _model()
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
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sparsify(model, BLOCK, optimizer)
    model(torch.randint(0, VOCAB, (2, CONTEXT))).square().mean().backward()
    for p in model.parameters():
        p.grad.add_(1.0)  # same tensor the grad hook masked, changed since
    optimizer.step()
    assert _violations(sparsifier, optimizer) == []
