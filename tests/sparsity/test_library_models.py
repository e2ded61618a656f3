"""The library on models nobody here wrote: ``sparsetrain.plan`` and ``sparsify`` on a Hugging Face
GPT-2 (its ``Conv1D`` weights are stored in x out), a small conv net and an ``nn.Sequential`` MLP;
``exclude``; N:M along the true input dimension; ``PackedOptimizer`` in one's own loop. The README
snippets of "Using the library on your own model" run here verbatim (``test_readme_*``)."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn

import sparsetrain
from sparsetrain.config import parse_sparsity
from sparsetrain.errors import ConfigError
from sparsetrain.kernels.blocks import is_block_structured
from sparsetrain.sparsity.masks import block_topk_mask, is_nm_structured, nm_topk_mask, num_pruned
from tests.helpers import cli

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GPT2_WEIGHTS = [f"transformer.h.{i}.{w}.weight" for i in range(2) for w in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # the same steps on two copies
    )
    return transformers.GPT2LMHeadModel(config)


class ConvNet(nn.Module):
    """A conv stem, a conv body and a linear classifier (no torchvision)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.relu(self.stem(x))).mean(dim=(2, 3))
        return self.head(x)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def weight_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.ndim > 1]


# -- plan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "expected"), [
    (gpt2, GPT2_WEIGHTS),  # embeddings (wte, wpe) and the tied lm_head stay dense
    (ConvNet, ["stem.weight", "body.weight", "head.weight"]),
    (mlp, ["0.weight", "2.weight", "4.weight"]),
])
def test_plan_lists_what_sparsify_takes(make, expected):
    model = make()
    report = sparsetrain.plan(model, {"sparsity": 0.75})
    assert report.names == expected and len(report) == len(expected)
    params = dict(model.named_parameters())
    for entry in report:
        assert entry.shape == tuple(params[entry.name].shape) and entry.sparsity == 0.75
        assert entry.structure == "unstructured" and entry.exact
        assert entry.pruned == num_pruned(entry.numel, 0.75) and entry.pruned + entry.kept == entry.numel
    assert set(report.dense) == set(params) - set(expected)
    sp = sparsetrain.sparsify(make(), {"sparsity": 0.75})  # one selection: the same parameters and counts
    assert list(sp.masks) == expected
    assert [int((~m).sum()) for m in sp.masks.values()] == [e.pruned for e in report]


def test_plan_table_columns_line_up_with_long_names():
    text = str(sparsetrain.plan(gpt2(), {"structure": "2:4"}))
    table = text.splitlines()[: 1 + len(GPT2_WEIGHTS)]
    assert table[0].split() == ["parameter", "shape", "group", "sparsity", "init", "structure", "kept"]
    assert len({len(line) for line in table}) == 1  # the right-aligned last column ends in one place
    starts = {line.index("default") for line in table[1:]}
    assert starts == {table[0].index("group")}
    assert "2:4 dim 0" in text  # Conv1D: the groups run along dim 0 (in x out)
    assert "8 sparsified tensors: 12,288 of 24,576 entries pruned (50.0%)" in text
    assert "left dense (20): transformer.wte.weight, transformer.wpe.weight" in text


def test_cli_plan_table_lines_up_and_reads_exclude(tiny_params, write_params, capsys):
    block = {"sparsity": 0.5, "exclude": [r"layers\.0\."]}
    path = write_params(tiny_params(sparsity=block))
    assert cli("plan", "--params", path) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("transformer_decoder.")]
    assert rows and all("layers.1." in line for line in rows)
    assert len({len(line) for line in [out[0], *rows]}) == 1


# -- exclude -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "exclude", "sparse"), [
    (ConvNet, [r"^stem\.", r"^head\."], ["body.weight"]),  # conv stem and classifier dense
    (mlp, [r"^0\.", r"^4\."], ["2.weight"]),
    (gpt2, "c_attn", [n for n in GPT2_WEIGHTS if "c_attn" not in n]),
])
def test_exclude_keeps_named_weights_dense(make, exclude, sparse):
    model = make()
    sp = sparsetrain.sparsify(model, {"sparsity": 0.5, "exclude": exclude})
    assert list(sp.masks) == sparse
    for name, p in model.named_parameters():
        zeros = int((p == 0).sum())
        if name in sparse:
            assert zeros == num_pruned(p.numel(), 0.5)
        elif p.ndim > 1:
            assert zeros == 0, name
    assert sparsetrain.plan(make(), {"sparsity": 0.5, "exclude": exclude}).names == sparse


def test_exclude_matching_nothing_is_one_line():
    with pytest.raises(ConfigError) as e:
        sparsetrain.sparsify(ConvNet(), {"sparsity": 0.5, "exclude": [r"^stem\.", "^classifier"]})
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        "sparsity.exclude[1] ('^classifier'): matches no parameter (a regex, re.search on the full name); "
        "the model's weights include: stem.weight, body.weight, head.weight"
    )
    with pytest.raises(ConfigError, match=r"^sparsity.exclude \('c_attn_x'\): .* transformer\.h\.N\.attn\.c_attn\.weight"):
        sparsetrain.plan(gpt2(), {"sparsity": 0.5, "exclude": "c_attn_x"})


def test_exclude_in_yaml_and_its_place_in_the_block():
    block = yaml.safe_load('sparsity: 0.5\nexclude: ["^stem\\\\.", "^head\\\\."]\n')
    config = parse_sparsity(block)
    assert config.exclude == (r"^stem\.", r"^head\.")
    assert parse_sparsity(config.to_dict()) == config and "exclude" in config.describe()
    assert list(sparsetrain.sparsify(ConvNet(), config).masks) == ["body.weight"]
    with pytest.raises(ConfigError, match=r"^sparsity.param_name_patterns\[\"body\"\]\.exclude: cannot be set per group"):
        parse_sparsity({"sparsity": 0.5, "param_name_patterns": {"body": {"exclude": "x"}}})
    with pytest.raises(ConfigError, match=r"^sparsity.exclude\[0\]: expected a regex string, got int 3"):
        parse_sparsity({"sparsity": 0.5, "exclude": [3]})
    with pytest.raises(ConfigError, match=r"^sparsity.exclude: '\(' is not a valid regex"):
        parse_sparsity({"sparsity": 0.5, "exclude": "("})
    # The zoo's list of groups: each item's exclude leaves its own selection; a later item may take it.
    parts = [{"sparsity": 0.5, "exclude": "head"}, {"sparsity": 0.25, "param_name_patterns": "head"}]
    sp = sparsetrain.sparsify(ConvNet(), parts)
    assert {n: s.sparsity for n, s in sp.settings.items()} == {"stem.weight": 0.5, "body.weight": 0.5, "head.weight": 0.25}


# -- N:M and blocks along the true input dimension ---------------------------------------------------


@pytest.mark.parametrize("init_method", ["topk", "random", "checkerboard"])
def test_nm_on_conv1d_runs_along_its_inputs(init_method):
    model = gpt2()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp = sparsetrain.sparsify(model, {"structure": "2:4", "init_method": init_method})
    assert list(sp.masks) == GPT2_WEIGHTS
    for name, mask in sp.masks.items():
        fan_in, fan_out = mask.shape  # Conv1D: in x out
        kept = mask.reshape(fan_in // 4, 4, fan_out).sum(dim=1)  # groups of 4 consecutive inputs, per output
        assert (kept == 2).all(), name
        assert sp.settings[name].input_dim == 0 and is_nm_structured(mask, 2, 4, dim=0)
        if init_method == "topk":  # what an nn.Linear holding the transposed weight would keep
            assert torch.equal(mask, nm_topk_mask(dense[name].T, 2, 4).T)


def test_conv1d_layer_equals_a_linear_masked_the_same_way():
    model = gpt2()
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, Conv1D)
    weight = layer.weight.detach().clone()
    sparsetrain.sparsify(model, {"structure": "2:4"})
    linear = nn.Linear(32, 128)
    with torch.no_grad():
        linear.weight.copy_(weight.T * nm_topk_mask(weight.T, 2, 4))
        linear.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), linear(x))


def test_nm_on_conv2d_groups_input_channels_and_the_stem_is_refused():
    with pytest.raises(ConfigError) as e:
        sparsetrain.plan(ConvNet(), {"structure": "2:4"})
    assert str(e.value) == (
        "sparsity.structure 2:4: parameter 'stem.weight' of shape (16, 3, 3, 3) has input dimension 1 of size 3, "
        "not a multiple of 4; N:M groups run along the input dimension. Keep it dense (sparsity.exclude), "
        "or give it structure: block or unstructured in its own group"
    )
    model = ConvNet()
    sp = sparsetrain.sparsify(model, {"structure": "2:4", "exclude": r"^stem\."})
    body = sp.masks["body.weight"]  # (out 32, in 16, 3, 3): 2 of each 4 input channels, per output and tap
    assert (body.reshape(32, 4, 4, 3, 3).sum(dim=2) == 2).all()
    assert is_nm_structured(sp.masks["head.weight"], 2, 4)  # nn.Linear: the last dimension, as before
    assert sparsetrain.plan(ConvNet(), {"structure": "2:4", "exclude": r"^stem\."})["body.weight"].input_dim == 1


def test_blocks_on_conv1d_read_as_outputs_by_inputs():
    model = gpt2()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    block = {"sparsity": 0.5, "structure": "block", "block_size": [16, 32]}  # 16 outputs x 32 inputs
    sp = sparsetrain.sparsify(model, block)
    for name, mask in sp.masks.items():
        assert is_block_structured(mask, (32, 16)) and is_block_structured(mask.T, (16, 32))
        assert torch.equal(mask, block_topk_mask(dense[name].T, 0.5, (16, 32)).T)
    entry = sparsetrain.plan(gpt2(), block)["transformer.h.0.mlp.c_fc.weight"]
    assert (entry.block_size, entry.blocks, entry.pruned_blocks, entry.gpu_kernels) == ((16, 32), 8, 4, False)


def test_conv1d_masks_given_back_are_kept_and_erk_blocks_add_up(caplog):
    block = {"structure": "2:4", "init_method": "random"}
    masks = sparsetrain.sparsify(gpt2(), block).masks
    other = gpt2()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    kept = sparsetrain.sparsify(other, block, masks=masks)  # a resume: the masks fit along dim 0
    assert all(torch.equal(kept.masks[n], masks[n]) for n in masks) and "does not fit" not in caplog.text
    erk = {"sparsity": 0.5, "structure": "block", "block_size": [16, 32], "distribution": "erk"}
    report = sparsetrain.plan(gpt2(), erk)
    assert sum(e.pruned_blocks for e in report) == sum(e.blocks for e in report) // 2 == 24
    assert sparsetrain.sparsify(gpt2(), erk).group_stats()[0]["mask"] == 0.5


# -- the packed optimizer --------------------------------------------------------------------------


def test_packed_optimizer_keeps_masks_and_equals_adamw_on_masked_weights():
    block = {"structure": "2:4"}
    packed_model, plain_model = gpt2(), gpt2()
    packed = sparsetrain.PackedOptimizer(packed_model.parameters(), kind="adamw", lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.1)
    sp = sparsetrain.sparsify(packed_model, block, packed)
    sparsetrain.sparsify(plain_model, block, plain)
    torch.manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 16))
        for model, opt in ((packed_model, packed), (plain_model, plain)):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    params = dict(packed_model.named_parameters())
    for name, mask in sp.masks.items():
        assert (params[name][~mask] == 0).all() and int((params[name] == 0).sum()) == mask.numel() // 2
        assert packed.state[params[name]]["exp_avg"].numel() == mask.numel() // 2  # kept entries only
    for (name, a), (_, b) in zip(packed_model.named_parameters(), plain_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_packed_optimizer_is_exported():
    import sparsetrain.optim.packed as packed
    import sparsetrain.sparsity
    from sparsetrain.optim import PackedOptimizer

    assert sparsetrain.PackedOptimizer is PackedOptimizer and "PackedOptimizer" in sparsetrain.__all__
    assert "your own loop" in packed.__doc__ and "Limits" in PackedOptimizer.__doc__
    assert sparsetrain.plan is sparsetrain.sparsity.plan and "plan" in sparsetrain.__all__


# -- the README snippets, verbatim ---------------------------------------------------------------


def test_readme_hf_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import sparsetrain

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    block = {"structure": "2:4", "exclude": [r"h\.0\.attn"]}   # 2 of every 4 inputs kept; layer 0's attention dense
    print(sparsetrain.plan(model, block))     # the table: which weights, shape, level, structure, kept
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    sp = sparsetrain.sparsify(model, block, opt)
    mask = sp.masks["transformer.h.1.mlp.c_fc.weight"]          # Conv1D, stored in x out: (32, 128)
    assert (mask.reshape(8, 4, 128).sum(dim=1) == 2).all()      # 2 kept in every 4 consecutive inputs

    assert len(sp.masks) == 6 and "transformer.h.0.attn.c_attn.weight" not in sp.masks


def test_readme_conv_net():
    from collections import OrderedDict

    from torch import nn

    import sparsetrain

    model = nn.Sequential(OrderedDict([
        ("stem", nn.Conv2d(3, 16, 3, padding=1)), ("act", nn.ReLU()),
        ("body", nn.Conv2d(16, 32, 3, padding=1)), ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
        ("classifier", nn.Linear(32, 10)),
    ]))
    block = {"sparsity": 0.5, "exclude": [r"^stem\.", r"^classifier\."]}   # first and last layers dense
    plan = sparsetrain.plan(model, block)
    print(plan)                               # body.weight only: 2,304 of its 4,608 entries pruned
    print(sparsetrain.plan(model, {**block, "structure": "2:4"}))   # or N:M: 2 of every 4 input channels
    sp = sparsetrain.sparsify(model, block)

    assert plan.names == ["body.weight"] and plan["body.weight"].pruned == 2304 and list(sp.masks) == ["body.weight"]


def test_readme_packed_optimizer_in_your_own_loop():
    import torch
    from torch import nn

    import sparsetrain

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = sparsetrain.PackedOptimizer(model.parameters(), kind="adamw", lr=1e-3, weight_decay=0.1)
    sp = sparsetrain.sparsify(model, {"sparsity": 0.75}, opt)    # hands the optimizer the masks
    for _ in range(3):
        x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()                            # pruned weights stay exactly 0
        opt.zero_grad()
    print(opt.state_bytes(), opt.dense_equivalent_bytes())      # state of kept entries only

    assert all((model.get_parameter(n)[~m] == 0).all() for n, m in sp.masks.items())
    assert opt.state_bytes()["masked"] < opt.dense_equivalent_bytes()["masked"]


def test_copy_of_model_plans_the_same():
    model = ConvNet()
    assert sparsetrain.plan(copy.deepcopy(model), {"sparsity": 0.5}).names == sparsetrain.plan(model, {"sparsity": 0.5}).names
    with torch.device("meta"):
        meta = ConvNet()
    assert [e.pruned for e in sparsetrain.plan(meta, {"sparsity": 0.5})] == [e.pruned for e in sparsetrain.plan(model, {"sparsity": 0.5})]
