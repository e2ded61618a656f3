"""Zoo checkpoints -> ours: the three sparsity forms, the zoo's parameter order of the optimizer
state, key mismatches, and the cstorch HDF5 container."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import torch

from sparsetrain.config import ModelParams, OptimizerParams
from sparsetrain.errors import CheckpointError
from sparsetrain.model import GPT
from sparsetrain.optim.build import build_optimizer
from sparsetrain.sparsity import nan_format
from sparsetrain.sparsity import zoo_checkpoints as zoo

L = 2
PATH = "runs/zoo/checkpoint_100.mdl"
SPARSE = [
    f"transformer_decoder.layers.{i}.{k}"
    for i in range(L)
    for k in ("self_attn.proj_q_dense_layer.weight", "self_attn.proj_k_dense_layer.weight",
              "self_attn.proj_v_dense_layer.weight", "self_attn.proj_output_dense_layer.weight",
              "ffn.ffn.0.linear_layer.weight", "ffn.ffn.1.linear_layer.weight")
]
LAYER_PARTS = (
    "self_attn.proj_q_dense_layer", "self_attn.proj_k_dense_layer", "self_attn.proj_v_dense_layer",
    "self_attn.proj_output_dense_layer", "norm1", "norm3", "ffn.ffn.0.linear_layer", "ffn.ffn.1.linear_layer",
)


def gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, num_hidden_layers=L, num_heads=2, vocab_size=64, max_position_embeddings=32)
    return GPT(ModelParams(**{**cfg, **overrides}))


def zoo_names() -> list[str]:
    """The zoo's named_parameters(), written out: embeddings, ln_f, the layers (weight, bias each)."""
    names = ["embedding_layer.word_embeddings.weight", "embedding_layer.position_embeddings.weight",
             "transformer_decoder.norm.weight", "transformer_decoder.norm.bias"]
    for i in range(L):
        names += [f"transformer_decoder.layers.{i}.{p}.{kind}" for p in LAYER_PARTS for kind in ("weight", "bias")]
    return names


def zoo_optimizer(model: GPT, names: list[str] | None = None):
    """A torch AdamW over the parameters in the zoo's order (two groups), stepped once on a loss
    whose gradient differs for every parameter; returns it and its state_dict."""
    params = dict(model.named_parameters())
    names = zoo_names() if names is None else names
    decay = [params[n] for n in names if "bias" not in n and "norm" not in n]
    rest = [params[n] for n in names if not ("bias" not in n and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    torch.manual_seed(1)
    sum((params[n] * torch.randn_like(params[n])).sum() for n in names).backward()
    opt.step()
    return opt, opt.state_dict()


def ours(model: GPT, **cfg):
    """Our optimizer, the name of each of its indices, and its param_groups."""
    opt = build_optimizer(model, OptimizerParams(weight_decay_rate=0.01, **cfg), torch.device("cpu"))
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    return opt, names, opt.state_dict()["param_groups"]


def random_masks(model_sd: dict, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(model_sd[n].shape, generator=g) < 0.5 for n in SPARSE}


def zoo_model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The zoo's state dict: our keys (ln_f alias included), fresh tensors."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- detection, keys, aliases ------------------------------------------------------------------


def test_is_zoo_checkpoint():
    sd = zoo_model_state(gpt())
    assert not zoo.is_zoo_checkpoint({"model": sd, "global_step": 0, "params": {}})
    assert zoo.is_zoo_checkpoint({"model": sd, "global_step": 0})
    buffer = {f"{SPARSE[0]}_mask": torch.ones(32, 32, dtype=torch.bool)}
    assert zoo.is_zoo_checkpoint({"model": {**sd, **buffer}, "params": {}})
    assert zoo.is_zoo_checkpoint({"model": sd, "params": {}, "sparsity": {}})
    opt = {"state": {}, "param_groups": [], "sparsity": {}}
    assert zoo.is_zoo_checkpoint({"model": sd, "params": {}, "optimizer": opt})
    assert not zoo.is_zoo_checkpoint([1]) and not zoo.is_zoo_checkpoint({"global_step": 1})


@pytest.mark.parametrize("drop", ["ln_f.", "transformer_decoder.norm."])
def test_final_norm_alias_and_tied_head_are_filled(drop):
    model = gpt()
    sd = zoo_model_state(model)
    expected_norm = sd["ln_f.weight"].clone()
    sd = {k: v for k, v in sd.items() if not k.startswith(drop) and k != "lm_head.weight"}
    out = zoo.from_zoo_checkpoint({"model": sd, "global_step": torch.tensor(7)}, model.state_dict(), PATH)
    assert list(out.model) == list(model.state_dict())
    torch.testing.assert_close(out.model["ln_f.weight"], expected_norm)
    torch.testing.assert_close(out.model["transformer_decoder.norm.bias"], out.model["ln_f.bias"])
    assert out.model["lm_head.weight"] is out.model["embedding_layer.word_embeddings.weight"]
    assert out.global_step == 7 and out.masks == {}
    assert out.notes[0] == "zoo checkpoint (dense): 0 sparse weights"
    assert out.optimizer is None and "optimizer state: not loaded (the checkpoint holds none)" in out.notes


def test_untied_head_is_not_filled_from_the_embeddings():
    model = gpt(share_embedding_weights=False)
    sd = {k: v for k, v in zoo_model_state(model).items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match=r"missing lm_head\.weight"):
        zoo.from_zoo_checkpoint({"model": sd, "global_step": 0}, model.state_dict(), PATH)


def test_keys_that_do_not_fit_give_one_line_errors():
    model = gpt()
    sd = zoo_model_state(model)
    renamed = dict(sd)
    renamed[SPARSE[0] + "s"] = renamed.pop(SPARSE[0])
    with pytest.raises(CheckpointError) as e:
        zoo.from_zoo_checkpoint({"model": renamed, "global_step": 0}, model.state_dict(), PATH)
    text = str(e.value)
    assert text == (f"{PATH}: checkpoint is for another model (missing {SPARSE[0]} (nearest in the checkpoint: "
                    f"{SPARSE[0]}s); unexpected {SPARSE[0]}s)")
    extra = {**sd, **{f"foo.{i}.weight": torch.zeros(1) for i in range(5)}}
    five = r"unexpected foo\.0\.weight, foo\.1\.weight, foo\.2\.weight and 2 more\)$"
    with pytest.raises(CheckpointError, match=five):
        zoo.from_zoo_checkpoint({"model": extra, "global_step": 0}, model.state_dict(), PATH)
    with pytest.raises(CheckpointError, match="global_step' is '-1', not a step number"):
        zoo.from_zoo_checkpoint({"model": sd, "global_step": -1}, model.state_dict(), PATH)
    bad_mask = {**sd, f"{SPARSE[0]}_mask": torch.ones(3, 3, dtype=torch.bool)}
    shape = rf"{PATH}: mask buffer for {SPARSE[0]} is \(3, 3\), the weight \(32, 32\)"
    with pytest.raises(CheckpointError, match=shape):
        zoo.from_zoo_checkpoint({"model": bad_mask, "global_step": 0}, model.state_dict(), PATH)


# -- the three sparsity forms -----------------------------------------------------------------


def assert_nan_exactly_where_pruned(out, masks):
    assert set(out.masks) == set(masks) == set(SPARSE)
    for name, mask in masks.items():
        assert torch.equal(out.masks[name], mask), name
        assert torch.equal(torch.isnan(out.model[name]), ~mask), name
    _, recovered = nan_format.decode_state_dict(out.model)
    assert recovered.keys() == masks.keys() and all(torch.equal(recovered[k], masks[k]) for k in masks)


def test_form_1x_nan():
    model = gpt()
    sd = zoo_model_state(model)
    masks = random_masks(sd)
    for name, mask in masks.items():
        sd[name] = sd[name].masked_fill(~mask, float("nan"))
    out = zoo.from_zoo_checkpoint({"model": sd, "global_step": 3}, model.state_dict(), PATH)
    assert_nan_exactly_where_pruned(out, masks)
    assert out.notes[0] == "zoo checkpoint (1.x NaN): 12 sparse weights"


def test_form_2_0_optimizer_masks():
    model = gpt()
    sd = zoo_model_state(model)
    masks = random_masks(sd)
    for name, mask in masks.items():
        sd[name] = sd[name] * mask  # pruned: 0
    # half the masks 0/1 floats, half bools; the sparsity entry's other keys are ignored
    stored = {n: {"mask": m.float() if i % 2 else m} for i, (n, m) in enumerate(masks.items())}
    opt = {"state": {}, "param_groups": [], "sparsity": {"state": stored, "param_groups": [{"sparsity": 0.5}]}}
    out = zoo.from_zoo_checkpoint({"model": sd, "optimizer": opt, "global_step": 3}, model.state_dict(), PATH)
    assert_nan_exactly_where_pruned(out, masks)
    assert out.notes[0] == "zoo checkpoint (2.0-2.1 optimizer masks): 12 sparse weights"
    assert sum(int((~m).sum()) for m in out.masks.values()) == sum(int((~m).sum()) for m in masks.values())


def test_form_2_2_mask_buffers_win_over_nans():
    model = gpt()
    sd = zoo_model_state(model)
    masks = random_masks(sd)
    for i, (name, mask) in enumerate(masks.items()):
        sd[name] = sd[name].masked_fill(~mask, float("nan") if i % 2 else 0.0)  # pruned: NaN or 0
        sd[name + "_mask"] = mask
    kept = torch.nonzero(masks[SPARSE[1]])[0].tolist()
    sd[SPARSE[1]][tuple(kept)] = float("nan")  # a NaN where the mask keeps: the mask wins
    state = {"model": sd, "global_step": torch.tensor(100), "sparsity": {"state": {}}, "lr_scheduler": {"x": 1}}
    out = zoo.from_zoo_checkpoint(state, model.state_dict(), PATH)
    assert_nan_exactly_where_pruned(out, masks)
    assert out.model[SPARSE[1]][tuple(kept)] == 0
    assert not any(k.endswith("_mask") for k in out.model) and list(out.model) == list(model.state_dict())
    assert out.global_step == 100
    assert out.notes[:2] == [
        "zoo checkpoint (2.2+ mask buffers): 12 sparse weights",
        "sparsity masks: 1 positions where the masks and the NaNs disagree; the masks win",
    ]
    assert any(n.startswith("lr_scheduler: the zoo's scheduler state is not loaded") for n in out.notes)
    model.load_state_dict(nan_format.decode_state_dict(out.model)[0])  # the existing path loads it


def test_mask_of_the_tied_head_it_does_not_store():
    model = gpt()
    sd = {k: v for k, v in zoo_model_state(model).items() if k != "lm_head.weight"}
    mask = torch.rand(64, 32, generator=torch.Generator().manual_seed(2)) < 0.5
    sd["lm_head.weight_mask"] = mask
    out = zoo.from_zoo_checkpoint({"model": sd, "global_step": 0, "sparsity": {}}, model.state_dict(), PATH)
    assert list(out.masks) == ["lm_head.weight"] and torch.equal(out.masks["lm_head.weight"], mask)
    for name in ("lm_head.weight", "embedding_layer.word_embeddings.weight"):  # one tensor: NaN under both names
        assert torch.equal(torch.isnan(out.model[name]), ~mask)


def test_through_torch_save(tmp_path):
    model = gpt()
    sd = zoo_model_state(model)
    masks = random_masks(sd)
    sd.update({n + "_mask": m for n, m in masks.items()})
    path = tmp_path / "checkpoint_5.mdl"
    torch.save({"model": sd, "global_step": torch.tensor(5), "sparsity": {}}, path)
    state = torch.load(path, weights_only=True)
    assert zoo.is_zoo_checkpoint(state)
    out = zoo.from_zoo_checkpoint(state, model.state_dict(), path)
    assert_nan_exactly_where_pruned(out, masks)


# -- the optimizer state ----------------------------------------------------------------------


def test_zoo_parameter_order():
    model = gpt()
    names = [n for n, _ in model.named_parameters()]
    assert "transformer_decoder.norm.weight" in names and "ln_f.weight" not in names
    expected = zoo_names()
    decay = [n for n in expected if "bias" not in n and "norm" not in n]
    assert zoo.zoo_parameter_order(names) == decay + [n for n in expected if n not in decay]
    assert zoo.zoo_parameter_order(["ln_f.weight", *names]) == zoo.zoo_parameter_order(names)


@pytest.mark.parametrize("cfg", [{}, {"decay_embeddings": True}])
def test_optimizer_state_lands_on_the_right_parameters(cfg):
    model = gpt()
    zoo_opt, zoo_sd = zoo_optimizer(model)
    opt, names, groups = ours(model, **cfg)
    sd = zoo_model_state(model)
    out = zoo.from_zoo_checkpoint({"model": sd, "optimizer": zoo_sd, "global_step": 1}, model.state_dict(), PATH,
                                  param_names=names, param_groups=groups)
    assert out.optimizer is not None, out.notes
    assert "optimizer state: mapped from the zoo's parameter order (36 parameters)" in out.notes
    assert out.optimizer["param_groups"] == groups  # our hyperparameters, not the zoo's
    opt.load_state_dict(out.optimizer)
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], zoo_opt.state[p][key], rtol=0, atol=0, msg=f"{name} {key}")
    exp_avgs = [zoo_opt.state[p]["exp_avg"].flatten()[:4] for p in model.parameters()]
    assert len({tuple(t.tolist()) for t in exp_avgs}) == len(exp_avgs)  # distinguishable per parameter


def test_optimizer_mapped_later_and_one_group():
    model = gpt()
    zoo_opt, zoo_sd = zoo_optimizer(model)
    out = zoo.from_zoo_checkpoint({"model": zoo_model_state(model), "optimizer": zoo_sd, "global_step": 1},
                                  model.state_dict(), PATH)
    assert out.optimizer is None and "optimizer state: not loaded (no optimizer to map it onto yet)" in out.notes
    assert out.zoo_optimizer is not None and set(out.zoo_optimizer) == {"state", "param_groups"}
    # one param group: the registration order, unsplit
    one = {"state": zoo_sd["state"], "param_groups": [{**zoo_sd["param_groups"][0], "params": list(range(36))}]}
    registered = zoo_names()
    order = zoo.zoo_parameter_order(registered)
    one["state"] = {registered.index(order[i]): s for i, s in zoo_sd["state"].items()}
    opt, names, groups = ours(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    mapped = zoo.map_zoo_optimizer(one, names, groups, shapes)
    opt.load_state_dict(mapped)
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg"], zoo_opt.state[p]["exp_avg"], rtol=0, atol=0)


def mismatch(zoo_sd, model, **cfg) -> tuple[dict | None, list[str]]:
    _, names, groups = ours(model, **cfg)
    notes: list[str] = []
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return zoo.map_zoo_optimizer(zoo_sd, names, groups, shapes, notes=notes), notes


def test_optimizer_mismatches_return_none_with_a_reason():
    model = gpt()
    _, zoo_sd = zoo_optimizer(model)
    # one parameter fewer
    _, short = zoo_optimizer(gpt(), zoo_names()[:-1])
    assert mismatch(short, model) == (None, ["the zoo's optimizer holds 35 parameters, this model's 36"])
    # the state of a (d,) bias swapped with that of a (4d,) one
    swapped = {**zoo_sd, "state": dict(zoo_sd["state"])}
    order = zoo.zoo_parameter_order(zoo_names())
    a, b = (order.index(f"transformer_decoder.layers.0.{n}") for n in ("ffn.ffn.0.linear_layer.bias", "norm3.bias"))
    swapped["state"][a], swapped["state"][b] = zoo_sd["state"][b], zoo_sd["state"][a]
    assert mismatch(swapped, model) == (None, [
        "state 'exp_avg' of transformer_decoder.layers.0.norm3.bias is (128,), the parameter (32,)"
    ])
    # group sizes not the zoo's rule: our own optimizer's state dict
    own, _, _ = ours(model)
    assert mismatch(own.state_dict(), model) == (None, [
        "unknown layout: param groups of 12 and 24 parameters, the zoo's rule gives 14 and 22"
    ])
    three = {**zoo_sd, "param_groups": [*zoo_sd["param_groups"], {"params": []}]}
    assert mismatch(three, model) == (None, ["unknown layout: 3 param groups (the zoo builds 2)"])
    assert mismatch({"state": []}, model)[1] == [
        "unknown layout: not a torch optimizer state dict (state, param_groups with params)"
    ]
    # SGD state for an Adam run
    sgd = {**zoo_sd, "state": {i: {"momentum_buffer": s["exp_avg"]} for i, s in zoo_sd["state"].items()}}
    result, notes = mismatch(sgd, model)
    assert result is None and notes[0].endswith("(momentum_buffer) is not this run's Adam state")
    out = zoo.from_zoo_checkpoint({"model": zoo_model_state(model), "optimizer": short, "global_step": 1},
                                  model.state_dict(), PATH, param_names=ours(model)[1], param_groups=ours(model)[2])
    assert "optimizer state: not loaded (the zoo's optimizer holds 35 parameters, this model's 36)" in out.notes


# -- the cstorch HDF5 container ---------------------------------------------------------------


def write_cstorch(path, flat: dict, kinds: dict | None = None) -> None:
    """An HDF5 file as cstorch.save lays it out: one root dataset per dotted key path (quoted),
    typed by ``__H5_TYPE__``, and the (never read) pickled spec as a root attribute."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        f.attrs["__spec__"] = "80049500"
        f.attrs["__version__"] = 0.4
        for key, value in flat.items():
            kind = (kinds or {}).get(key)
            if isinstance(value, torch.Tensor):
                d = f.create_dataset(quote(key, safe=""), data=value.numpy())
                d.attrs["__H5_TYPE__"] = kind or "TorchTensorH5Type"
            else:
                d = f.create_dataset(quote(key, safe=""), data=value)
                d.attrs["__H5_TYPE__"] = kind or "ScalarH5Type"


def test_read_cstorch_hdf5(tmp_path):
    model = gpt()
    _, zoo_sd = zoo_optimizer(model)
    sd = zoo_model_state(model)
    masks = random_masks(sd)
    flat = {f"model.{k}": v for k, v in sd.items()}
    flat.update({f"model.{n}_mask": m for n, m in masks.items()})
    for i, entry in zoo_sd["state"].items():
        flat.update({f"optimizer.state.{i}.{k}": v for k, v in entry.items()})
    for g, group in enumerate(zoo_sd["param_groups"]):
        flat.update({f"optimizer.param_groups.{g}.params.{j}": p for j, p in enumerate(group["params"])})
        flat[f"optimizer.param_groups.{g}.lr"] = group["lr"]
    flat["global_step"] = 100
    flat[f"optimizer.sparsity.state.{SPARSE[0]}.mask"] = masks[SPARSE[0]]  # the 2.0-2.1 form's path
    path = tmp_path / "checkpoint_100.mdl"
    write_cstorch(path, flat)
    h5py = pytest.importorskip("h5py")
    half = torch.randn(3, 2).to(torch.bfloat16)
    with h5py.File(path, "a") as f:  # a bf16 tensor, stored as 16-bit integers; a nested group's attribute
        d = f.create_dataset("extra.half", data=half.view(torch.int16).numpy())
        d.attrs["__H5_TYPE__"], d.attrs["is_bfloat16"] = "TorchTensorH5Type", True
        f.create_group("extra").attrs["count"] = 3
    assert zoo.is_hdf5(path)
    state = zoo.read_cstorch_hdf5(path)
    assert state["extra"]["count"] == 3 and torch.equal(state["extra"]["half"], half)
    assert state["global_step"] == 100 and state["model"].keys() == {k[6:] for k in flat if k.startswith("model.")}
    assert [g["params"] for g in state["optimizer"]["param_groups"]] == [g["params"] for g in zoo_sd["param_groups"]]
    assert torch.equal(state["optimizer"]["sparsity"]["state"][SPARSE[0]]["mask"], masks[SPARSE[0]])
    _, names, groups = ours(model)
    out = zoo.from_zoo_checkpoint(state, model.state_dict(), path, param_names=names, param_groups=groups)
    assert_nan_exactly_where_pruned(out, masks)
    assert out.optimizer is not None and out.global_step == 100
    torch.testing.assert_close(out.optimizer["state"][0]["exp_avg"], zoo_sd["state"][2]["exp_avg"])  # q weight


def test_unreadable_hdf5_layouts(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    obj = tmp_path / "object.mdl"
    write_cstorch(obj, {"model.a.weight": torch.zeros(2), "lr_scheduler.fn": 1}, {"lr_scheduler.fn": "ObjectH5Type"})
    with pytest.raises(CheckpointError) as e:
        zoo.read_cstorch_hdf5(obj)
    assert str(e.value) == (
        f"{obj}: a Cerebras HDF5 checkpoint (cstorch.save) whose layout is not readable here "
        "('lr_scheduler.fn' is a ObjectH5Type); convert it on the zoo side with cstorch.load + torch.save"
    )
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("images", data=torch.zeros(3, 4).numpy())
    no_model = r"plain\.h5: .* not readable here \(no 'model' entry of tensors\); convert"
    with pytest.raises(CheckpointError, match=no_model):
        zoo.read_cstorch_hdf5(plain)
    text = tmp_path / "text.mdl"
    text.write_bytes(b"PK\x03\x04 not hdf5")
    assert not zoo.is_hdf5(text)
    with pytest.raises(CheckpointError, match=r"text\.mdl: not an HDF5 file"):
        zoo.read_cstorch_hdf5(text)
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)
    needs = r"object\.mdl: a Cerebras HDF5 checkpoint \(cstorch\.save\); reading it needs h5py: pip install h5py$"
    with pytest.raises(CheckpointError, match=needs):
        zoo.read_cstorch_hdf5(obj)


@pytest.mark.parametrize("form", ["2.0", "2.2"])
def test_masked_model_view_counts_every_form_as_nan(form):
    """What ``inspect`` counts: NaN at pruned positions, mask buffers gone, whatever the form."""
    model = gpt()
    sd = zoo_model_state(model)
    masks = random_masks(sd)
    for name, mask in masks.items():
        sd[name] = sd[name] * mask
    state = {"model": sd, "global_step": 3}
    if form == "2.0":
        state["optimizer"] = {"state": {}, "param_groups": [], "sparsity": {"state": {n: {"mask": m} for n, m in masks.items()}}}
    else:
        sd.update({f"{n}_mask": m for n, m in masks.items()})
    view = zoo.masked_model_view(state)
    assert not any(k.endswith("_mask") for k in view)
    for name, mask in masks.items():
        assert torch.equal(torch.isnan(view[name]), ~mask), name
    dense = next(k for k in view if k.endswith("norm1.weight"))
    assert not torch.isnan(view[dense]).any()
