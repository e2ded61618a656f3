"""The model zoo's params layouts read natively: each zoo key honoured with the zoo's meaning,
listed as having no effect on GPUs, or refused in one line."""

from __future__ import annotations

import copy

import pytest
import yaml

from sparsetrain.config import load_params, params_from_dict
from sparsetrain.errors import ConfigError
from tests.zoo_files import KINDS, LAYOUTS, gpt2_small_1x, gpt3

DYNAMIC = ("set75", "rigl75", "sparsewide-ift_rigl75")


def _error(raw, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        params_from_dict(copy.deepcopy(raw), overrides)
    return str(e.value)


@pytest.mark.parametrize("layout", ["2.0", "2.2", "2.4"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_gpt3_file_reads_with_the_zoos_meaning(layout, kind):
    raw = gpt3(kind, layout, "train", "val")
    p = params_from_dict(raw)
    if kind in DYNAMIC:  # 2.0-2.1: type + schedule {freq, stop}; 2.2+: algorithm + update: the same run
        half = 30  # tests/zoo_files.py shrinks the zoo's {freq: 100, stop: 3584} and half_period 3584
        for g in p.sparsity.groups:
            d = g.dynamic
            assert d.algorithm == ("set" if "set" in kind else "rigl")
            assert (d.update.freq, d.update.start, d.update.stop) == (10, 0, half)
            assert d.level(100, 1) == 0.75 and g.sparsity == 0.75 and g.init_method == "random"
            assert d.drop(0, 0) == pytest.approx(0.3) and d.drop(half, 9) == pytest.approx(0.0, abs=1e-12)
        return
    assert p.layout == ("zoo trainer" if layout == "2.4" else "zoo")
    assert (p.optimizer.beta1, p.optimizer.beta2) == (0.9, 0.999 if kind == "vspdf_dart" else 0.95)
    assert p.optimizer.eps == (1e-9 if "vspdf" in kind else 1e-8)
    assert p.optimizer.weight_decay_rate == (0.01 if kind == "vspdf_dart" else 0.1)
    assert p.optimizer.decay_embeddings is True  # the zoo decays every weight but biases and norms
    assert p.optimizer.max_gradient_norm == 1.0
    assert p.optimizer.learning_rate == [
        {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 6.0e-4, "total_iters": 2},
        {"scheduler": "CosineDecay", "initial_learning_rate": 6.0e-4, "end_learning_rate": 6.0e-5, "total_iters": 6},
    ]
    assert p.train_input.source == "hdf5" and p.train_input.data_dir == "train"
    assert p.train_input.max_sequence_length is None  # the data's (the zoo's GPT-3 files carry none)
    assert p.train_input.shuffle_seed == 0 and p.eval_input.shuffle is False
    assert p.model.initializer == {"mean": 0.0, "name": "truncated_normal", "std": 0.02, "a": -0.04, "b": 0.04}
    assert p.model.nonlinearity == "gelu"
    assert p.runconfig.max_steps == 3 and p.runconfig.log_steps == 1 and p.runconfig.eval_steps == 1
    assert p.runconfig.checkpoint_steps == 3
    assert "loss_scaling_factor" in " ".join(p.no_effect)
    if kind in ("static75", "sparsewide-ift_static50", "vspdf_phase1"):
        assert p.sparsity is not None and p.sparsity.groups[0].sparsity == {"static75": 0.75, "vspdf_phase1": 0.9}.get(kind, 0.5)
    else:
        assert p.sparsity is None


def test_no_effect_keys_are_listed_as_written():
    p = params_from_dict(gpt3("static75", "2.4", "t", "v"))
    assert set(p.no_effect) == {
        "trainer.init.precision.enabled", "trainer.init.precision.fp16_type",
        "trainer.init.precision.precision_opt_level", "trainer.init.precision.loss_scaling_factor",
        "trainer.init.precision.log_loss_scale", "trainer.init.backend.backend_type",
        "trainer.init.callbacks.ComputeNorm",
        "trainer.fit.train_dataloader.num_workers", "trainer.fit.train_dataloader.prefetch_factor",
        "trainer.fit.train_dataloader.persistent_workers", "trainer.fit.val_dataloader.num_workers",
        "trainer.fit.val_dataloader.prefetch_factor", "trainer.fit.val_dataloader.persistent_workers",
        "trainer.init.model.name", "trainer.init.model.mixed_precision", "trainer.init.model.use_bfloat16",
    }


def test_gpt2_small_1x_keys():
    p = params_from_dict(gpt2_small_1x("t", "v"))
    assert p.optimizer.optimizer_type == "AdamW"  # "adamw" in any case
    assert p.optimizer.eps == 1e-6  # the zoo's default when the file gives none
    assert p.optimizer.weight_decay_rate == 0.01
    assert [ph["total_iters"] for ph in p.optimizer.learning_rate] == [2, 6]  # 1.x `steps`
    assert "alpha" not in p.optimizer.learning_rate[1]
    assert "optimizer.learning_rate[1].alpha" in p.no_effect
    # Before loss_scaling existed (1.7) the loss was sum / batch_size * loss_weight.
    assert (p.model.loss_scaling, p.model.loss_weight) == ("batch_size", 1 / 16)
    assert p.runconfig.model_dir == "./model_dir" and p.runconfig.seed == 1
    assert p.model.dropout_rate == 0.1 and p.model.attention_dropout_rate == 0.1
    # No initializer in the file: the zoo's truncated normal, output layers scaled by 1/sqrt(2 L).
    assert p.model.initializer == {"name": "truncated_normal", "mean": 0.0, "std": 0.02}
    assert p.model.output_layer_initializer["std"] == pytest.approx(0.02 / 2)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("optimizer", "correct_bias", False,
         "optimizer.correct_bias: False is not valid here: Adam without bias correction is not built here "
         "(torch always corrects) (only True)"),
        ("optimizer", "optimizer_type", "Lamb",
         "optimizer.optimizer_type: 'Lamb' is not built here; choose one of AdamW, Adam, SGD (any case)"),
        ("model", "position_embedding_type", "rotary",
         "model.position_embedding_type: 'rotary' is not built here; only learned absolute position embeddings "
         "(GPT-2 / GPT-3)"),
        ("train_input", "data_processor", "GptTextDataProcessor",
         "train_input.data_processor: 'GptTextDataProcessor' is not built here; choose GptHDF5MapDataProcessor or "
         "GptHDF5DataProcessor (the zoo's HDF5 data)"),
        ("optimizer", "disable_lr_steps_reset", True,
         "optimizer.disable_lr_steps_reset: True is not valid here: phases that do not restart their step count are "
         "not built here (only False)"),
    ],
)
def test_refused_zoo_values_one_line(section, key, value, message):
    raw = gpt3("static75", "2.0", "t", "v")
    raw[section][key] = value
    assert _error(raw) == message


def test_trainer_refusals_name_the_trainer_path():
    raw = gpt3("static75", "2.4", "t", "v")
    raw["trainer"]["init"]["optimizer"]["AdamW"]["correct_bias"] = False
    assert _error(raw).startswith("trainer.init.optimizer.AdamW.correct_bias: False is not valid here")
    raw = gpt3("static75", "2.4", "t", "v")
    raw["trainer"]["init"]["model"]["hidden_size"] = "wide"
    assert _error(raw) == "trainer.init.model.hidden_size: expected an integer, got 'wide'"
    raw = gpt3("static75", "2.4", "t", "v")
    raw["trainer"]["init"]["optimizer"]["AdamW"]["betas"] = [0.9, 1.5]
    assert _error(raw) == "trainer.init.optimizer.AdamW.betas: 1.5 is above the maximum 1.0"
    raw = gpt3("static75", "2.4", "t", "v")
    raw["trainer"]["init"]["callbacks"].append({"GlobalFlags": {}})
    assert _error(raw).startswith("trainer.init.callbacks[1].GlobalFlags: not built here (only callbacks that observe")
    raw = gpt3("static75", "2.4", "t", "v")
    raw["trainer"]["validate"]["val_dataloader"]["batch_size"] = 8
    assert _error(raw) == (
        "trainer.validate.val_dataloader: differs from trainer.fit.val_dataloader; one evaluation dataset is "
        "built here (make them the same)"
    )


def test_unknown_keys_stay_errors_with_the_nearest():
    raw = gpt3("static75", "2.0", "t", "v")
    raw["model"]["hiden_size"] = 3
    assert _error(raw) == "model.hiden_size: unknown key; did you mean 'hidden_size'?"
    raw = gpt3("static75", "2.4", "t", "v")
    raw["trainer"]["init"]["loop"]["max_stepz"] = 3
    assert _error(raw) == "trainer.init.loop.max_stepz: unknown key; did you mean 'max_steps'?"


def test_synonym_and_our_key_both_set_is_an_error():
    raw = gpt3("static75", "2.0", "t", "v")
    raw["optimizer"]["beta2"] = 0.99
    assert _error(raw) == "optimizer.betas: sets optimizer.beta2, which is set too; give one of them"
    raw = gpt3("static75", "2.0", "t", "v")
    raw["optimizer"]["weight_decay_rate"] = 0.2
    assert _error(raw) == (
        "optimizer.weight_decay: the zoo's name of optimizer.weight_decay_rate, which is set too; give one of them"
    )


def test_micro_batch_size_is_gradient_accumulation():
    raw = gpt3("static75", "2.2", "t", "v")
    raw["train_input"]["micro_batch_size"] = 2
    assert params_from_dict(raw).optimizer.grad_accum_steps == 2  # batch 4 in micro-batches of 2
    raw["train_input"]["micro_batch_size"] = 3
    assert _error(raw) == "train_input.micro_batch_size: 3 does not divide batch_size 4"
    raw["train_input"]["micro_batch_size"] = "auto"
    p = params_from_dict(raw)
    assert p.optimizer.grad_accum_steps == 1 and "train_input.micro_batch_size" in p.no_effect


def test_epsilon_use_nesterov_and_scheduler_case():
    raw = gpt3("static75", "2.0", "t", "v")
    opt = raw["optimizer"]
    opt["epsilon"] = opt.pop("eps")
    opt["learning_rate"][0]["scheduler"] = "linearlr"
    opt["learning_rate"][1]["scheduler"] = "COSINEDECAY"
    p = params_from_dict(raw)
    assert p.optimizer.eps == 1e-8
    assert [ph["scheduler"] for ph in p.optimizer.learning_rate] == ["Linear", "CosineDecay"]


def test_our_layout_unchanged_and_any_case_optimizer():
    p = params_from_dict({"optimizer": {"optimizer_type": "adamw"}})
    assert p.layout == "sparsetrain" and p.no_effect == ()
    assert p.optimizer.optimizer_type == "AdamW" and p.optimizer.eps == 1e-8
    assert p.optimizer.decay_embeddings is False and p.model.nonlinearity == "gelu_new"
    assert p.model.initializer is None and p.train_input.max_sequence_length == 128


def test_trainer_overrides_by_file_path_or_our_sections():
    raw = gpt3("static75", "2.4", "t", "v")
    p = params_from_dict(copy.deepcopy(raw), ["trainer.init.loop.max_steps=7", "runconfig.log_steps=5"])
    assert p.runconfig.max_steps == 7 and p.runconfig.log_steps == 5
    assert _error(raw, ["runconfig.log_steps=0"]) == "runconfig.log_steps: 0 is below the minimum 1"


def test_unset_deletes_a_key(tmp_path):
    raw = gpt3("static75", "2.0", "t", "v")
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(raw))
    p = load_params(path, unset=["optimizer.eps", "sparsity"])
    assert p.optimizer.eps == 1e-6 and p.sparsity is None  # the zoo's default eps; dense
    with pytest.raises(ConfigError) as e:
        load_params(path, unset=["optimizer.nope"])
    assert str(e.value) == f"{path}: --unset 'optimizer.nope': no such key in the params file"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_file_is_the_same_run(tmp_path, layout):
    from sparsetrain.config import dump_params

    raw = gpt2_small_1x("t", "v") if layout == "1.x" else gpt3("static75", layout, "t", "v")
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(raw))
    p = load_params(path)
    text = dump_params(p)
    assert f"# from {path} (" in text and "# zoo keys with no effect on GPUs (not written below):" in text
    (tmp_path / "ours.yaml").write_text(text)
    again = load_params(tmp_path / "ours.yaml")
    assert again == p


def test_glob_and_regex_dialects_select_zoo_names():
    from sparsetrain.model import GPT
    from sparsetrain.sparsity.select import select_for_model

    def selected(block):
        p = params_from_dict({"model": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 64},
                              "sparsity": block})
        return sorted(select_for_model(GPT(p.model), p.sparsity))

    regex = selected({"sparsity": 0.5, "param_name_patterns": [".*proj_[qkv]_dense_layer.weight"]})
    glob = selected({"sparsity": 0.5, "param_filter": ["*proj_[qkv]_dense_layer.weight"]})
    assert regex == glob == sorted(
        f"transformer_decoder.layers.{i}.self_attn.proj_{x}_dense_layer.weight" for i in range(2) for x in "qkv"
    )
    assert selected({"sparsity": 0.5, "param_filter": "*proj_q_dense_layer.weight"}) == [
        f"transformer_decoder.layers.{i}.self_attn.proj_q_dense_layer.weight" for i in range(2)
    ]
    everything = selected({"sparsity": 0.5, "param_filter": "*linear_layer.weight"})
    assert len(everything) == 4
    # Globs match the whole name: no leading * means the name starts there.
    with pytest.raises(ConfigError) as e:
        selected({"sparsity": 0.5, "param_filter": "linear_layer.weight"})
    assert "sparsity.param_filter ('linear_layer.weight')" in str(e.value)


def test_trainer_changes_in_our_paths_come_before_the_zoo_defaults():
    raw = gpt3("static75", "2.4", "t", "v")
    model = raw["trainer"]["init"]["model"]
    del model["initializer"], model["output_layer_initializer"]
    p = params_from_dict(copy.deepcopy(raw), ["model.num_hidden_layers=8"])
    assert p.model.output_layer_initializer["std"] == pytest.approx(0.02 / 4)  # / sqrt(2 * 8), the new count
    p = params_from_dict(copy.deepcopy(raw), unset=["sparsity", "optimizer.eps"])
    assert p.sparsity is None and p.optimizer.eps == 1e-6
    assert _error(raw, ["trainer.init.loop.max_steps=5", "runconfig.max_steps=2"]) == (
        "runconfig.max_steps: changed on the command line both as runconfig.max_steps and as "
        "trainer.init.loop.max_steps (the file's name of the same key); give one of them"
    )


def test_sequential_lr_milestones_must_be_the_phase_ends():
    raw = gpt3("static75", "2.4", "t", "v")
    seq = raw["trainer"]["init"]["schedulers"][0]["SequentialLR"]
    seq["milestones"] = [2]
    assert params_from_dict(copy.deepcopy(raw)).optimizer.learning_rate[0]["total_iters"] == 2
    seq["milestones"] = [100]
    assert _error(raw) == (
        "trainer.init.schedulers[0].SequentialLR.milestones: [100] is not where the phases end ([2]); "
        "the phases run one after another, each for its total_iters (drop milestones or make them agree)"
    )


@pytest.mark.parametrize("section, key, value, message", [
    ("train_input", "use_vsl", True,
     "train_input.use_vsl: True is not valid here: variable-sequence-length packing is not built here (only False)"),
    ("train_input", "num_samples", 100,
     "train_input.num_samples: 100 is not valid here: limiting the samples read is not built here; use data_subset "
     "(only None)"),
    ("model", "name", "llama", "model.name: 'llama' is not built here; choose gpt2 or gpt3"),
    ("runconfig", "disable_strict_checkpoint_loading", True,
     "runconfig.disable_strict_checkpoint_loading: True is not valid here: checkpoints load strictly here (every "
     "key must fit the model) (only False)"),
])
def test_zoo_keys_that_change_training_are_refused_at_other_values(section, key, value, message):
    raw = gpt3("static75", "2.0", "t", "v")
    raw[section][key] = value
    assert _error(raw) == message
    raw[section][key] = {"use_vsl": False, "num_samples": None, "name": "gpt3",
                         "disable_strict_checkpoint_loading": False}[key]
    params_from_dict(raw)  # the value built here is accepted
