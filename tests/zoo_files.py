"""Params files in the model zoo's layouts, built here from the zoo's documented keys (not copied
from its repository): the GPT-2 small file of 1.x, and the GPT-3 sparsity files (static, SET,
RigL, sparse-wide dense, vspdf phases 1 and 2, DART fine-tuning) in the 2.0-2.1, 2.2-2.3 and 2.4+
(``trainer:``) layouts. Sizes are tiny so the files train a few CPU steps; every other key is as
the zoo writes it.
"""

from __future__ import annotations

import copy
from typing import Any

LAYOUTS = ("1.x", "2.0", "2.2", "2.4")
KINDS = ("static75", "set75", "rigl75", "sparsewide-ift_dense", "sparsewide-ift_static50",
         "sparsewide-ift_rigl75", "vspdf_phase1", "vspdf_phase2", "vspdf_dart")
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "filter_size": 64,
        "max_position_embeddings": 64, "vocab_size": 96}
TRUNC = {"mean": 0.0, "name": "truncated_normal", "std": 0.02, "a": -0.04, "b": 0.04}


def _model(kind: str) -> dict[str, Any]:
    model = {
        **TINY, "position_embedding_type": "learned", "share_embedding_weights": True,
        "dropout_rate": 0.0, "layer_norm_epsilon": 1.0e-5, "attention_type": "scaled_dot_product",
        "attention_dropout_rate": 0.0, "use_projection_bias_in_attention": True, "use_ffn_bias_in_attention": True,
        "nonlinearity": "gelu", "use_ffn_bias": True,
        "embedding_initializer": dict(TRUNC), "initializer": dict(TRUNC),
        "output_layer_initializer": {**TRUNC, "std": 0.004082482904638631, "a": -0.008164965809277261,
                                     "b": 0.008164965809277261},
        "loss_scaling": "num_tokens", "loss_weight": 1.0, "use_bias_in_output": False,
        "mixed_precision": True, "fp16_type": "cbfloat16",
    }
    if kind == "static75":
        model.update(loss_scaling="batch_size", loss_weight=1 / 16, use_bfloat16=True)
        model.pop("fp16_type")
    return model


def _sparsity(kind: str, layout: str) -> dict[str, Any] | None:
    level = {"static75": 0.75, "set75": 0.75, "rigl75": 0.75, "sparsewide-ift_static50": 0.5,
             "sparsewide-ift_rigl75": 0.75, "vspdf_phase1": 0.9}.get(kind)
    if level is None:
        return None
    dynamic = "set" if "set" in kind else "rigl" if "rigl" in kind else None
    if layout in ("1.x", "2.0"):
        block: dict[str, Any] = {"sparsity": level, "init_method": "random", "type": dynamic or "static",
                                 "param_name_patterns": [".*proj_[qkv]_dense_layer.weight",
                                                         ".*proj_output_dense_layer.weight", ".*linear_layer.weight"]}
        if dynamic:
            block.update(schedule={"freq": 10, "stop": 30}, drop_fraction={"type": "cosine", "init": 0.3, "half_period": 30})
        return block
    block = {"sparsity": level, "init_method": "random",
             "param_filter": ["*proj_[qkv]_dense_layer.weight", "*proj_output_dense_layer.weight", "*linear_layer.weight"]}
    if dynamic:
        block.update(algorithm=dynamic, update={"freq": 10, "stop": 30},
                     drop_fraction={"type": "cosine", "init": 0.3, "half_period": 30})
    return block


def _optimizer(kind: str) -> dict[str, Any]:
    dart = kind == "vspdf_dart"
    return {
        "optimizer_type": "AdamW", "betas": [0.9, 0.999 if dart else 0.95], "eps": 1.0e-9 if "vspdf" in kind else 1.0e-8,
        "max_gradient_norm": 1.0,
        "learning_rate": [
            {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 6.0e-4, "total_iters": 2},
            {"scheduler": "CosineDecay", "initial_learning_rate": 6.0e-4, "end_learning_rate": 6.0e-5, "total_iters": 6},
        ],
        "weight_decay": 0.01 if dart else 0.1, "correct_bias": True, "log_summaries": True,
        "loss_scaling_factor": "dynamic",
    }


def _data(data_dir: Any, batch: int, shuffle: bool) -> dict[str, Any]:
    out = {"data_processor": "GptHDF5MapDataProcessor", "data_dir": data_dir, "batch_size": batch,
           "shuffle": shuffle, "num_workers": 1, "prefetch_factor": 10, "persistent_workers": True}
    if shuffle:
        out["shuffle_seed"] = 0
    return out


def gpt2_small_1x(train_dir: str, eval_dir: str) -> dict[str, Any]:
    """The 1.x GPT-2 small file's keys (GptHDF5DataProcessor, ``steps`` phases, no loss_scaling)."""
    return {
        "train_input": {**_data(train_dir, 4, True), "data_processor": "GptHDF5DataProcessor",
                        "max_sequence_length": 16, "shuffle_seed": 1337},
        "eval_input": {"data_processor": "GptHDF5DataProcessor", "data_dir": eval_dir, "max_sequence_length": 16,
                       "batch_size": 4, "shuffle": False, "num_workers": 8},
        "model": {**TINY, "use_position_embedding": True, "position_embedding_type": "learned",
                  "share_embedding_weights": True, "dropout_rate": 0.1, "layer_norm_epsilon": 1.0e-5,
                  "attention_type": "scaled_dot_product", "attention_dropout_rate": 0.1,
                  "use_projection_bias_in_attention": True, "use_ffn_bias_in_attention": True,
                  "nonlinearity": "gelu", "use_ffn_bias": True, "use_bias_in_output": False,
                  "loss_weight": 1 / 16, "mixed_precision": True, "allow_multireplica": False},
        "optimizer": {"optimizer_type": "adamw", "correct_bias": True, "disable_lr_steps_reset": False,
                      "weight_decay_rate": 0.01,
                      "learning_rate": [
                          {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 1.0e-4, "steps": 2},
                          {"scheduler": "Linear", "initial_learning_rate": 1.0e-4, "end_learning_rate": 0.0, "steps": 6,
                           "alpha": 0.1},
                      ]},
        "runconfig": {"max_steps": 3, "log_steps": 1, "checkpoint_steps": 0, "save_initial_checkpoint": False,
                      "seed": 1, "model_dir": "./model_dir", "show_debug_metrics": False, "save_losses": True,
                      "eval_steps": 1},
    }


def gpt3(kind: str, layout: str, train_dir: Any, eval_dir: str) -> dict[str, Any]:
    """A GPT-3 sparsity file of ``kind`` in ``layout`` (2.0, 2.2 or 2.4; 1.x is the 2.0 form)."""
    sparsity = _sparsity(kind, layout)
    train, val = _data(train_dir, 4, True), _data(eval_dir, 4, False)
    if layout in ("1.x", "2.0", "2.2"):
        out = {"train_input": train, "eval_input": val, "model": _model(kind), "optimizer": _optimizer(kind),
               "runconfig": {"max_steps": 3, "eval_steps": 1, "checkpoint_steps": 3, "enable_distributed": False,
                             "log_steps": 1, "save_initial_checkpoint": False, "precision_opt_level": 1}}
        if layout == "2.2":
            out["runconfig"]["eval_frequency"] = 3
            train["micro_batch_size"] = None
        if sparsity is not None:
            out["sparsity"] = sparsity
        return out
    opt = _optimizer(kind)
    phases = opt.pop("learning_rate")
    precision = {"enabled": True, "fp16_type": "cbfloat16", "precision_opt_level": 1,
                 "loss_scaling_factor": opt.pop("loss_scaling_factor"), "max_gradient_norm": opt.pop("max_gradient_norm"),
                 "log_loss_scale": True}
    opt.pop("optimizer_type"), opt.pop("log_summaries")
    init = {
        "backend": {"backend_type": "CSX"}, "model": {"name": "gpt3", **_model(kind)},
        "optimizer": {"AdamW": opt},
        "schedulers": [{"SequentialLR": {"schedulers": [
            {f"{p['scheduler']}LR": {k: v for k, v in p.items() if k != "scheduler"}} for p in phases]}}],
        "precision": precision,
        "loop": {"max_steps": 3, "eval_frequency": 3, "eval_steps": 1},
        "checkpoint": {"steps": 3, "save_initial_checkpoint": False},
        "logging": {"log_steps": 1},
        "callbacks": [{"ComputeNorm": {}}],
    }
    if sparsity is not None:
        init["sparsity"] = sparsity
    return {"trainer": {"init": init, "fit": {"train_dataloader": train, "val_dataloader": val},
                        "validate": {"val_dataloader": copy.deepcopy(val)},
                        "validate_all": {"val_dataloaders": copy.deepcopy(val)}}}
