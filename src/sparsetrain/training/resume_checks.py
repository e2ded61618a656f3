"""What a full resume keeps from its checkpoint and what it takes from the params, said out loud.

The rule: a full resume continues the run. The params file as given now wins for every setting it
can change mid-run -- optimizer hyperparameters (torch's ``load_state_dict`` would silently put
the checkpoint's back), the learning-rate schedule, ``max_steps``, batch size, data -- and each such
change is named in a warning, because the run no longer equals an uninterrupted one. What cannot
carry over is refused in one line that says how to do it on purpose: another kind of optimizer
(its state is another's), or dropping the ``sparsity:`` block of a sparse run (the masks would be
lost at the next pruned checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsetrain.config import Params
from sparsetrain.errors import CheckpointError

# Parameter-group keys the schedule or the optimizer's bookkeeping owns: not settings to re-apply.
_NOT_SETTINGS = ("params", "lr", "initial_lr")


def check_resumable(state: dict[str, Any], path: Path) -> None:
    """A weights-only file (a ``.safetensors``) has no optimizer, schedule or RNG to continue."""
    if state.get("weights_only"):
        raise CheckpointError(
            f"{path}: holds weights only (a .safetensors file), so it cannot continue a run; warm start "
            "from it instead: --checkpoint_path with a --model_dir that holds no checkpoints"
        )


def check_sparsity_kept(params: Params, masks: dict, path: Path) -> None:
    """A full resume of a sparse checkpoint needs a ``sparsity:`` block (see the module docstring)."""
    if not masks or params.sparsity is not None:
        return
    pruned = sum(int((~m).sum()) for m in masks.values())
    raise CheckpointError(
        f"{path}: a sparse run ({pruned:,} pruned weights in {len(masks)} tensors), and the params have no "
        "sparsity block; a resume keeps the run's sparsity: resume with its params (model_dir/params.yaml). "
        "To train on dense on purpose, set 'sparsity: 0.0' (the same run, dense from here), or warm start "
        "a new model_dir from it (--checkpoint_path with another --model_dir: dense fine-tuning)"
    )


def check_optimizer_kind(saved: dict[str, Any] | None, params: Params, path: Path) -> None:
    """The checkpoint's optimizer must be the one the params ask for: its state is that optimizer's."""
    before = ((saved or {}).get("optimizer") or {}).get("optimizer_type")
    now = params.optimizer.optimizer_type
    if before is not None and str(before) != now:
        raise CheckpointError(
            f"{path}: its optimizer state is {before}'s and optimizer.optimizer_type is {now}; a resume "
            f"continues the optimizer: set optimizer_type: {before}, or warm start a new model_dir from it "
            f"(--checkpoint_path with another --model_dir: the weights, a fresh {now})"
        )
    before = ((saved or {}).get("optimizer") or {}).get("decay_embeddings")
    now_decay = params.optimizer.decay_embeddings
    if before is not None and bool(before) != now_decay:
        raise CheckpointError(
            f"{path}: optimizer.decay_embeddings: {before} -> {now_decay} regroups the optimizer's parameters, "
            f"and a resume continues the checkpoint's groups: keep decay_embeddings: {before}, or warm start a "
            "new model_dir from it (--checkpoint_path with another --model_dir)"
        )


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, template: list[dict[str, Any]]) -> None:
    """Put the params' hyperparameters (``template``: the freshly built optimizer's param groups)
    back over the loaded ones; :func:`resume_changes` names each change by its params key."""
    for group, fresh in zip(optimizer.param_groups, template, strict=True):
        group.update({key: value for key, value in fresh.items() if key not in _NOT_SETTINGS})


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


DATA_KEYS = ("source", "data_path", "data_dir", "mixture", "data_subset", "tokenizer", "bpe_vocab_size")
# Settings of the batches, the regularisation and the optimizer a run may change mid-run: each
# change is named (in the params' own key) so that a resume never differs from the run silently.
ORDER_KEYS = ("shuffle", "shuffle_seed")
MODEL_KEYS = ("dropout_rate", "attention_dropout_rate")
OPTIMIZER_SKIP = ("optimizer_type", "decay_embeddings", "packed_state")  # refused, or storage only


def resume_changes(saved: dict[str, Any] | None, params: Params, step: int, data_change: str | None = None,
                   data_known: bool = False) -> list[str]:
    """Warnings for settings of the checkpoint's params that differ now: batch size, context length,
    batch order (shuffle, shuffle_seed, the seed), dropout, every optimizer key (learning rate and
    schedule, clipping, Adam's, ...: the params' values are the ones trained with), max_steps (the
    learning-rate schedule is a function of it), the data. ``data_change``: how the training tokens
    differ from the checkpoint's fingerprint of them (``data_known``: it had one; otherwise the data
    keys of the params are compared instead)."""
    notes = []
    if data_change:
        notes.append(f"train_input: {data_change} (other batches from step {step} on than an uninterrupted run's)")
    if not saved:
        return notes
    now = params.to_dict()
    before_in, now_in = saved.get("train_input") or {}, params.train_input
    for key, what in (("batch_size", "batch size"), ("max_sequence_length", "context length")):
        old, new = before_in.get(key), getattr(now_in, key)
        if old is not None and new is not None and old != new:
            notes.append(f"train_input.{key}: {old} -> {new} ({what} changed mid-run: the batches from step "
                         f"{step} on differ from an uninterrupted run's)")
    for key in () if data_known else DATA_KEYS:
        old, new = before_in.get(key), getattr(now_in, key, None)
        if key in before_in and old != new:
            notes.append(f"train_input.{key}: {old!r} -> {new!r} (other data from step {step} on)")
    for key in ORDER_KEYS:
        if key in before_in and before_in[key] != now["train_input"].get(key):
            notes.append(f"train_input.{key}: {_short(before_in[key])} -> {_short(now['train_input'].get(key))} "
                         f"(another batch order from step {step} on)")
    old_seed, new_seed = (saved.get("runconfig") or {}).get("seed"), params.runconfig.seed
    if old_seed is not None and old_seed != new_seed and params.train_input.shuffle_seed is None:
        notes.append(f"runconfig.seed: {old_seed} -> {new_seed} (batches are drawn from the seed: other batches "
                     f"from step {step} on; the weights are the checkpoint's)")
    for section, keys in (("model", MODEL_KEYS), ("optimizer", None)):
        before_s, now_s = saved.get(section) or {}, now.get(section) or {}
        for key in keys or [k for k in now_s if k not in OPTIMIZER_SKIP]:
            if key in before_s and before_s[key] != now_s.get(key):
                notes.append(f"{section}.{key}: {_short(before_s[key])} -> {_short(now_s.get(key))} (from step {step} on)")
    old_max = (saved.get("runconfig") or {}).get("max_steps")
    new_max = params.runconfig.max_steps
    changed_max = old_max is not None and old_max != new_max and new_max > step  # else nothing to train: fit says so
    if changed_max and isinstance(params.optimizer.learning_rate, list):
        notes.append(f"runconfig.max_steps: {old_max} -> {new_max}: the learning-rate schedule is stretched to "
                     f"the new length from step {step} on (its phases without total_iters end at max_steps)")
    elif changed_max:
        notes.append(f"runconfig.max_steps: {old_max} -> {new_max}")
    return notes
