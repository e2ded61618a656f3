"""Checkpoints of the Cerebras model zoo, turned into this package's checkpoint form.

A zoo checkpoint (``checkpoint_<step>.mdl``) holds ``model`` (zoo names, with the ``ln_f.*`` alias
and maybe ``lm_head.weight``), ``optimizer`` (torch layout, in the zoo's parameter order),
``lr_scheduler`` (the zoo's own classes: never loaded here) and ``global_step``. Its sparsity
comes in one of three forms, all turned into the NaN form of :mod:`sparsetrain.sparsity.nan_format`
so that the existing loading path recovers the masks: 1.x, NaN at pruned positions (ours already);
2.0-2.1, ``optimizer["sparsity"]["state"][name]["mask"]``; 2.2+, a ``model["<name>_mask"]`` buffer
per sparse weight and a top-level ``sparsity`` entry. All is pure (no I/O) but
:func:`read_cstorch_hdf5`, the reader of ``cstorch.save``'s HDF5 files.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsetrain import checkpoint as ckpt
from sparsetrain.checkpoint import WRITER, is_hdf5
from sparsetrain.errors import CheckpointError
from sparsetrain.sparsity.zoo_hdf5 import read_cstorch_hdf5

__all__ = [
    "ZooCheckpoint", "from_zoo_checkpoint", "is_zoo_checkpoint", "map_zoo_optimizer", "masked_model_view",
    "read_any_checkpoint", "read_cstorch_hdf5", "zoo_parameter_order",
]

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer")  # the per-parameter state kept
FINAL_NORM = ("ln_f.", "transformer_decoder.norm.")  # one module under two names
TIED = ("lm_head.weight", "embedding_layer.word_embeddings.weight")


@dataclass
class ZooCheckpoint:
    """A zoo checkpoint in our form: ``model`` has exactly our model's keys, NaN where pruned;
    ``optimizer`` is in our optimizer's order, as a checkpoint holds it (a 1.x one's NaNs are kept:
    ``nan_format.decode_optimizer_state`` on loading), None where ``notes`` say why; ``zoo_optimizer``
    is the zoo's torch-format optimizer state, for :func:`map_zoo_optimizer` once our optimizer exists."""

    model: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    global_step: int
    optimizer: dict[str, Any] | None = None
    zoo_optimizer: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def is_zoo_checkpoint(state: Any) -> bool:
    """True for a checkpoint dict the zoo wrote: not marked as ours (``writer``), and no ``params``
    of ours or a zoo sparsity form."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or state.get("writer") == WRITER:
        return False
    opt = state.get("optimizer")
    in_opt = isinstance(opt, dict) and "sparsity" in opt
    return "params" not in state or "sparsity" in state or in_opt or bool(_mask_buffers(state["model"]))


def read_any_checkpoint(path: Path | str) -> dict[str, Any]:
    """A checkpoint file of ours or the zoo's: ``torch.save`` (``checkpoint.load_checkpoint``, safe
    loading) or the zoo's ``cstorch.save`` HDF5 container; or a ``.safetensors`` file of weights
    (``checkpoint.load_safetensors``: ``weights_only`` set)."""
    ckpt.check_regular_file(Path(path))
    if ckpt.is_safetensors(path):
        return ckpt.load_safetensors(Path(path))
    if is_hdf5(path):
        state = read_cstorch_hdf5(path)
        state.setdefault("global_step", 0)
        state["global_step"] = _step(state["global_step"], path)
        return state
    return ckpt.load_checkpoint(Path(path))


def masked_model_view(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights with NaN at every pruned position, whatever the zoo's sparsity form
    (NaN, 2.0-2.1 optimizer masks, 2.2+ ``_mask`` buffers, dropped): what ``inspect`` counts."""
    zoo = state["model"]
    masks = {**_optimizer_masks(state.get("optimizer")), **_mask_buffers(zoo)}
    out = {k: v for k, v in zoo.items() if not (k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in masks)}
    for name, mask in masks.items():
        if name in out and out[name].shape == mask.shape and out[name].is_floating_point():
            out[name] = out[name].masked_fill(~mask.bool(), float("nan"))
    return out


def from_zoo_checkpoint(
    state: dict[str, Any], model_state: dict[str, torch.Tensor], path: Path | str, *,
    param_names: list[str] | None = None, param_groups: list[dict] | None = None,
) -> ZooCheckpoint:
    """Convert a zoo checkpoint dict for the model whose ``state_dict()`` is ``model_state``.

    With ``param_names`` (the name of each index of our optimizer) and ``param_groups`` (its
    ``state_dict()["param_groups"]``) the optimizer state is mapped too; without them it waits in
    ``zoo_optimizer``. Keys that do not fit raise a one-line :class:`CheckpointError`.
    """
    zoo = state.get("model")
    if not isinstance(zoo, dict):
        raise CheckpointError(f"{path}: not a model zoo checkpoint (no 'model' state dict)")
    buffers, opt_masks = _mask_buffers(zoo, model_state), _optimizer_masks(state.get("optimizer"))
    weights = {k: v for k, v in zoo.items() if not (k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in buffers)}
    model, filled = _our_keys(weights, model_state, path)
    ckpt.check_model_state(model, model_state, path)

    nan_masks = {k: ~torch.isnan(v) for k, v in model.items() if v.is_floating_point() and torch.isnan(v).any()}
    explicit = {}  # 2.2+ buffers win over 2.0-2.1 optimizer masks, both over NaNs
    for source, where in ((opt_masks, "optimizer sparsity state"), (buffers, "mask buffer")):
        explicit.update({name: _check_mask(name, m, model, where, path) for name, m in source.items()})
    masks = {**nan_masks, **explicit}
    notes = [_form_note(state, buffers, opt_masks, nan_masks, len(masks))]
    differ = sum(int((m != nan_masks[k]).sum()) for k, m in explicit.items() if k in nan_masks)
    if differ:
        notes.append(f"sparsity masks: {differ} positions where the masks and the NaNs disagree; the masks win")
    for name, mask in explicit.items():  # pruned -> NaN; a NaN the mask keeps -> 0
        model[name] = model[name].masked_fill(torch.isnan(model[name]), 0).masked_fill(~mask, float("nan"))
    for target, source in filled.items():  # one tensor under two names: masked where either is
        if target in explicit:
            model[source] = model[target]
        else:
            model[target] = model[source]

    opt = state.get("optimizer")
    zoo_opt = {k: opt[k] for k in ("state", "param_groups") if k in opt} if isinstance(opt, dict) else {}
    optimizer, reasons = None, []
    if "param_groups" not in zoo_opt:
        zoo_opt, reasons = None, ["the checkpoint holds none"]
    elif param_names is None or param_groups is None:
        reasons.append("no optimizer to map it onto yet")
    else:
        shapes = {k: v.shape for k, v in model_state.items()}
        optimizer = map_zoo_optimizer(zoo_opt, param_names, param_groups, shapes, notes=reasons)
    if optimizer is not None:
        notes.append(f"optimizer state: mapped from the zoo's parameter order ({len(param_names)} parameters)")
        notes += [f"optimizer state: {r}" for r in reasons]
    else:
        notes.append(f"optimizer state: not loaded ({'; '.join(reasons)})")
    if state.get("lr_scheduler"):
        notes.append("lr_scheduler: the zoo's scheduler state is not loaded; the schedule comes from the params")
    return ZooCheckpoint(model, masks, _step(state.get("global_step", 0), path), optimizer, zoo_opt, notes)


def zoo_parameter_order(names: list[str]) -> list[str]:
    """Our deduplicated ``named_parameters()`` names in the zoo optimizer's index order.

    The zoo registers the final norm (``ln_f``, our ``transformer_decoder.norm``) right after the
    embeddings, and numbers the decayed parameters (no ``bias``, not in a norm) before the rest.
    """
    registered = _registration_order(names)
    return [n for n in registered if _decays(n)] + [n for n in registered if not _decays(n)]


def map_zoo_optimizer(
    zoo_opt: dict[str, Any], our_names_in_our_order: list[str], our_param_groups_template: list[dict],
    shapes: dict[str, torch.Size], *, notes: list[str] | None = None,
) -> dict[str, Any] | None:
    """The zoo's optimizer state dict re-keyed to our optimizer's indices, with our param groups'
    hyperparameters; None when it does not fit, the reason appended to ``notes``.

    ``our_names_in_our_order`` names each index of ``our_param_groups_template`` (our optimizer's
    ``state_dict()["param_groups"]``); ``shapes`` holds every parameter's shape in the model's
    ``state_dict()`` order, which gives the modules' order the zoo numbers its parameters in.
    """
    try:
        return _map_optimizer(zoo_opt, our_names_in_our_order, our_param_groups_template, shapes, notes)
    except _Mismatch as e:
        log.debug("zoo optimizer state not mapped: %s", e)
        if notes is not None:
            notes.append(str(e))
        return None


# -- model state -------------------------------------------------------------------------------


class _Mismatch(ValueError):
    """Why a zoo state does not fit (one line)."""


def _alias(name: str) -> str | None:
    """The other name of a final-norm parameter."""
    a, b = FINAL_NORM if name.startswith(FINAL_NORM[0]) else FINAL_NORM[::-1]
    return b + name[len(a):] if name.startswith(a) else None


def _canonical(name: str) -> str:
    """``transformer_decoder.norm.*`` for ``ln_f.*``, as our ``named_parameters()`` say."""
    return _alias(name) if name.startswith(FINAL_NORM[0]) else name


def _mask_buffers(zoo: dict[str, Any], known: Any = ()) -> dict[str, torch.Tensor]:
    """The 2.2+ form: ``<name>_mask`` tensors for a ``<name>`` in ``zoo`` (or ``known``), by ``<name>``."""
    n = len(MASK_SUFFIX)
    return {
        k[:-n]: v for k, v in zoo.items()
        if k.endswith(MASK_SUFFIX) and (k[:-n] in zoo or k[:-n] in known) and torch.is_tensor(v)
    }


def _optimizer_masks(opt: Any) -> dict[str, torch.Tensor]:
    """The 2.0-2.1 form: ``optimizer["sparsity"]["state"][name]["mask"]``."""
    sparsity = opt.get("sparsity") if isinstance(opt, dict) else None
    entries = sparsity.get("state") if isinstance(sparsity, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {n: e["mask"] for n, e in entries.items() if isinstance(e, dict) and torch.is_tensor(e.get("mask"))}


def _our_keys(weights: dict[str, Any], model_state: dict[str, torch.Tensor], path: Path | str):
    """``weights`` with exactly ``model_state``'s keys, in its order; and {filled key: its source}."""
    a, b = (model_state.get(k) for k in TIED)
    tied = a is not None and b is not None and a.device.type != "meta" and a.shape == b.shape
    tied = tied and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    out, filled = {}, {}
    for key in model_state:
        sources = [key, _alias(key)] + ([t for t in TIED if t != key] if tied and key in TIED else [])
        source = next((s for s in sources if s is not None and s in weights), None)
        if source is not None:
            out[key] = weights[source]
            if source != key:
                filled[key] = source
    unexpected = [k for k in weights if k not in model_state]
    missing = [k for k in model_state if k not in out]
    if missing or unexpected:
        pool = unexpected or list(weights)
        parts = [f"missing {_few([k + _nearest(k, pool) for k in missing[:3]] + missing[3:])}"] if missing else []
        parts += [f"unexpected {_few(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{path}: checkpoint is for another model ({'; '.join(parts)})")
    return out, filled


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _nearest(name: str, pool: list[str]) -> str:
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.5)
    return f" (nearest in the checkpoint: {close[0]})" if close else ""


def _check_mask(name: str, mask: torch.Tensor, model: dict, where: str, path: Path | str) -> torch.Tensor:
    if name not in model:
        raise CheckpointError(f"{path}: {where} for {name}, which the model does not have{_nearest(name, list(model))}")
    weight = model[name]
    if tuple(mask.shape) != tuple(weight.shape) or not weight.is_floating_point():
        raise CheckpointError(f"{path}: {where} for {name} is {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
    return mask.to(device=weight.device, dtype=torch.bool)


def _form_note(state: dict, buffers: dict, opt_masks: dict, nan_masks: dict, count: int) -> str:
    forms = []
    if buffers or "sparsity" in state:
        forms.append("2.2+ mask buffers" if buffers else "2.2+ sparsifier state, no mask buffers")
    if opt_masks:
        forms.append("2.0-2.1 optimizer masks")
    if nan_masks.keys() - buffers.keys() - opt_masks.keys():
        forms.append("1.x NaN")
    return f"zoo checkpoint ({', '.join(forms) or 'dense'}): {count} sparse weights"


def _step(step: Any, path: Path | str) -> int:
    if torch.is_tensor(step) and step.numel() == 1:
        step = step.item()
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'global_step' is {str(step)[:40]!r}, not a step number")
    return step


# -- optimizer state ---------------------------------------------------------------------------


def _decays(name: str) -> bool:
    """The zoo's weight-decay rule: no ``bias`` in the name, not inside a (layer) norm."""
    return "bias" not in name and not any("norm" in p.lower() or p.startswith("ln_") for p in name.split(".")[:-1])


def _registration_order(names: list[str]) -> list[str]:
    """The zoo's ``named_parameters()`` order of our names: the final norm right after the embeddings."""
    canon = list(dict.fromkeys(map(_canonical, names)))
    final = [n for n in canon if n.startswith(FINAL_NORM[1])]
    rest = [n for n in canon if n not in final]
    at = max((i + 1 for i, n in enumerate(rest) if n.startswith("embedding_layer.")), default=0)
    return rest[:at] + final + rest[at:]


def _map_optimizer(zoo_opt: Any, names: list[str], template: list[dict], shapes: dict, notes: list | None) -> dict:
    state, groups = (zoo_opt.get("state"), zoo_opt.get("param_groups")) if isinstance(zoo_opt, dict) else (0, 0)
    if not isinstance(state, dict) or not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise _Mismatch("unknown layout: not a torch optimizer state dict (state, param_groups with params)")
    ours, theirs = [i for g in template for i in g["params"]], [i for g in groups for i in g["params"]]
    if len(ours) != len(names):  # the caller's mistake, not the checkpoint's
        raise ValueError(f"{len(names)} parameter names for an optimizer of {len(ours)} parameters")
    if len(theirs) != len(names):
        raise _Mismatch(f"the zoo's optimizer holds {len(theirs)} parameters, this model's {len(names)}")
    if len(set(theirs)) != len(theirs):
        raise _Mismatch("unknown layout: a parameter index appears twice in the param groups")
    if unknown := [n for n in names if n not in shapes]:
        raise _Mismatch(f"no parameter shape for {unknown[0]}")
    position = {n: i for i, n in enumerate(shapes)}  # the state-dict order: the modules' order
    module_order = sorted(names, key=position.__getitem__)
    order = zoo_parameter_order(module_order)
    decayed = sum(map(_decays, order))
    if len(groups) == 1:  # one group: the registration order, unsplit
        order = _registration_order(module_order)
    elif len(groups) != 2:
        raise _Mismatch(f"unknown layout: {len(groups)} param groups (the zoo builds 2)")
    elif [len(g["params"]) for g in groups] != [decayed, len(order) - decayed]:
        sizes, rule = " and ".join(str(len(g["params"])) for g in groups), f"{decayed} and {len(order) - decayed}"
        raise _Mismatch(f"unknown layout: param groups of {sizes} parameters, the zoo's rule gives {rule}")
    name_of = dict(zip(theirs, order, strict=True))
    index_of = {_canonical(n): i for n, i in zip(names, ours, strict=True)}
    adam = any("betas" in g for g in template)
    out, dropped = {}, set()
    for index, entry in state.items():
        name = name_of.get(index)
        if name is None or not isinstance(entry, dict):
            raise _Mismatch(f"unknown layout: state entry {str(index)[:40]!r} belongs to no parameter of the groups")
        kept = {}
        for key, value in entry.items():
            if key not in STATE_KEYS:
                dropped.add(str(key))
            elif torch.is_tensor(value) and value.ndim > 0 and value.shape != shapes[name]:
                raise _Mismatch(f"state {key!r} of {name} is {tuple(value.shape)}, the parameter {tuple(shapes[name])}")
            else:
                kept[key] = value
        if ("momentum_buffer" in kept) == adam and kept.keys() - {"step"}:
            kind = "Adam" if adam else "SGD"
            raise _Mismatch(f"the zoo's state of {name} ({', '.join(sorted(kept))}) is not this run's {kind} state")
        out[index_of[name]] = kept
    if dropped and notes is not None:
        notes.append(f"zoo state entries left out: {', '.join(sorted(dropped))}")
    return {"state": dict(sorted(out.items())), "param_groups": [dict(g, params=list(g["params"])) for g in template]}


