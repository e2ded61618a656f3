"""The model zoo's params keys that are not ours, and what each becomes here.

Facts from the zoo's public repository (``Cerebras/modelzoo``, R_1.7.0 to Release_2.10.0). Every
key of its GPT-2 / GPT-3 params files is one of:

- a *synonym* of one of our keys (``betas`` -> ``beta1``/``beta2``, ``weight_decay`` ->
  ``weight_decay_rate``, ...): honoured with the zoo's meaning by :mod:`sparsetrain.config.zoo`;
- :data:`NO_EFFECT`: accepted, and listed once in the run's log as having no effect on GPUs
  (the Cerebras compiler, its precision modes, data-loader workers);
- :data:`REFUSED`: accepted only at the value that matches what is built here (the zoo's
  ``correct_bias: true``); another value would change training and is an error.

Anything else stays an unknown key, with the nearest valid key in the error.
"""

from __future__ import annotations

from typing import Any

# Section -> keys accepted with no effect on a GPU.
NO_EFFECT: dict[str, tuple[str, ...]] = {
    "train_input": (
        "num_workers", "prefetch_factor", "persistent_workers", "use_worker_cache", "n_parallel_reads",
        "pad_last", "vocab_size", "repeat", "shuffle_buffer",
    ),
    "model": (
        "mixed_precision", "use_bfloat16", "fp16_type", "allow_multireplica", "attention_softmax_fp32",
        "name", "precision_opt_level", "boundary_casting", "tf_summary", "compute_eval_metrics",
    ),
    "optimizer": (
        "log_summaries", "loss_scaling_factor", "initial_loss_scale", "max_loss_scale", "min_loss_scale",
        "steps_per_increase",
    ),
    "runconfig": (
        "save_losses", "show_debug_metrics", "enable_distributed", "precision_opt_level", "use_cs_grad_accum",
        "use_appliance_data", "num_csx", "num_workers_per_csx", "num_wgt_servers", "num_act_servers",
        "credentials_path", "mount_dirs", "python_paths", "job_labels", "compile_dir", "log_summaries",
        "execute_crd_memory_gi", "wrk_memory_gi", "act_memory_gi", "cmd_memory_gi", "wgt_memory_gi",
        "experimental_api", "disable_version_check", "dist_backend", "init_method", "sync_batchnorm",
        "check_loss_values", "log_input_summaries", "mode", "target_device",
        "transfer_processes", "job_time_sec", "logging", "lazy_initialization",
    ),
}
NO_EFFECT["eval_input"] = NO_EFFECT["train_input"]

# 2.4+ ``trainer.init`` sub-sections and keys with no effect on a GPU (the others are mapped).
TRAINER_NO_EFFECT: dict[str, tuple[str, ...]] = {
    "precision": (
        "enabled", "fp16_type", "precision_opt_level", "loss_scaling_factor", "log_loss_scale",
        "initial_loss_scale", "max_loss_scale", "min_loss_scale", "steps_per_increase",
    ),
    "backend": ("backend_type", "cluster_config", "compile_dir", "compile_only", "validate_only", "retrace_every_iteration"),
    "logging": ("log_level", "enable_act_frequency", "streams"),
    "checkpoint": ("check_loss_values",),
}
# 2.4+ callbacks that only observe training (logging norms, checks), so nothing changes on a GPU.
OBSERVING_CALLBACKS = ("ComputeNorm", "CheckLoss", "LogOptimizerParamGroup", "RateProfiler", "FlopUtilization")

# Key -> the one value built here; another value is refused (it would change training).
_INPUT_REFUSED = {
    "use_vsl": (False, "variable-sequence-length packing is not built here"),
    "drop_last": (True, "every batch here is full (drop_last: true)"),
    "sort_files": (True, "the files of a data_dir are read in sorted order here"),
    "num_samples": (None, "limiting the samples read is not built here; use data_subset"),
}
REFUSED: dict[str, dict[str, tuple[Any, str]]] = {
    "train_input": _INPUT_REFUSED,
    "eval_input": _INPUT_REFUSED,
    "model": {
        "use_position_embedding": (True, "a model without position embeddings is not built here"),
        "embedding_layer_norm": (False, "a layer norm after the embeddings is not built here"),
        "embeddings_scale": (1.0, "scaled embeddings are not built here"),
        "output_logits_scale": (None, "scaled output logits are not built here"),
        "scale_qk_dot_by_d": (False, "scaling attention scores by d (muP) is not built here"),
        "fixed_sparse_attention": (None, "fixed sparse attention is not built here"),
        "norm_type": ("layernorm", "only layernorm is built here"),
        "label_smoothing": (0.0, "label smoothing is not built here"),
        "z_loss_coefficient": (0.0, "z-loss is not built here"),
    },
    "optimizer": {
        "correct_bias": (True, "Adam without bias correction is not built here (torch always corrects)"),
        "use_bias_correction": (True, "Adam without bias correction is not built here (torch always corrects)"),
        "disable_lr_steps_reset": (False, "phases that do not restart their step count are not built here"),
        "amsgrad": (False, "AMSGrad is not built here"),
    },
    "runconfig": {
        "checkpoint_path": (None, "give the checkpoint on the command line: --checkpoint_path"),
        "load_checkpoint_states": (None, "choosing which states of a checkpoint to load is not built here"),
        "autoload_last_checkpoint": (True, "a run here always resumes from the newest checkpoint in model_dir"),
        "disable_strict_checkpoint_loading": (False, "checkpoints load strictly here (every key must fit the model)"),
    },
}

# Canonical optimizer names (the zoo accepts any case).
OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
# The zoo's scheduler names (any case, with or without the ``LR`` suffix) -> ours.
SCHEDULERS = {"linear": "Linear", "cosinedecay": "CosineDecay", "constant": "Constant"}
# Keys of one LR phase, zoo spelling -> ours; ``alpha`` is read by no phase kind built here
# (the zoo's own linear phase ignores it too).
PHASE_SYNONYMS = {"steps": "total_iters", "decay_steps": "total_iters", "learning_rate": "initial_learning_rate",
                  "val": "initial_learning_rate", "base_lr": "initial_learning_rate"}
PHASE_NO_EFFECT = ("alpha",)
# The zoo's model names built here (``trainer.init.model.name``).
MODEL_NAMES = ("gpt2", "gpt3")
# The zoo's data processors built here.
DATA_PROCESSORS = ("GptHDF5MapDataProcessor", "GptHDF5DataProcessor")

# Keys that only the zoo writes: their presence marks a file as the zoo's, so that the zoo's
# defaults apply (see config.zoo). Keys the two layouts share (data_dir, the bias switches, ...)
# mark nothing.
ZOO_MARKERS: dict[str, tuple[str, ...]] = {
    "train_input": ("data_processor", "micro_batch_size", *NO_EFFECT["train_input"], *_INPUT_REFUSED),
    "eval_input": ("data_processor", "micro_batch_size", *NO_EFFECT["eval_input"], *_INPUT_REFUSED),
    "model": (*NO_EFFECT["model"], *REFUSED["model"]),
    "optimizer": ("betas", "weight_decay", "epsilon", *NO_EFFECT["optimizer"], *REFUSED["optimizer"]),
    "runconfig": (*NO_EFFECT["runconfig"], *REFUSED["runconfig"]),
}


def optimizer_name(kind: str) -> str | None:
    """Our spelling of an optimizer name in any case (``adamw`` -> ``AdamW``), None if unknown."""
    return OPTIMIZERS.get(kind.lower())


def scheduler_name(kind: str) -> str | None:
    """Our spelling of a scheduler name in any case, with or without ``LR``, None if unknown."""
    return SCHEDULERS.get(kind.lower().removesuffix("lr"))
