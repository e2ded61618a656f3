"""The model zoo's params files, read natively: each layout becomes our sections, with the zoo's
meaning, before one validation (:func:`sparsetrain.config.params.params_from_dict`).

Layouts (facts from ``Cerebras/modelzoo``, R_1.7.0 to Release_2.10.0):

- 1.x and 2.0-2.3: top-level ``train_input``, ``eval_input``, ``model``, ``optimizer``,
  ``sparsity``, ``runconfig``, as ours, with zoo keys beside ours;
- 2.4+: ``trainer: {init: {model, optimizer: {AdamW: {...}}, schedulers: [{SequentialLR: ...}],
  precision, sparsity, loop, checkpoint, logging, callbacks, backend}, fit: {train_dataloader,
  val_dataloader}, validate, validate_all}``.

:func:`from_zoo` returns our sections, the zoo keys that have no effect on a GPU (the run lists them
in one log line) and, for error messages, where each of our keys came from in the file. A file
counts as the zoo's when it is the 2.4+ layout or any section holds a zoo-only key
(:data:`~sparsetrain.config.zoo_keys.ZOO_MARKERS`); then the zoo's defaults apply where the file is
silent: truncated-normal initializers (std ``initializer_range``, output layers scaled by
1/sqrt(2 L)), exact ``gelu``, Adam ``eps`` 1e-6, weight decay on every weight but biases and
norms (embeddings too), and a sequence length taken from the HDF5 data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparsetrain.config.fields import closest, key_text
from sparsetrain.config.zoo_keys import (
    DATA_PROCESSORS,
    MODEL_NAMES,
    NO_EFFECT,
    OBSERVING_CALLBACKS,
    OPTIMIZERS,
    PHASE_NO_EFFECT,
    PHASE_SYNONYMS,
    REFUSED,
    SCHEDULERS,
    TRAINER_NO_EFFECT,
    ZOO_MARKERS,
    optimizer_name,
    scheduler_name,
)
from sparsetrain.errors import ConfigError

SECTION_NAMES = ("train_input", "eval_input", "model", "optimizer", "runconfig", "sparsity")


@dataclass
class Translation:
    """A params mapping in our sections, and what the zoo's keys became."""

    raw: dict[str, Any]
    layout: str  # "sparsetrain", "zoo" (sections, 1.x-2.3) or "zoo trainer" (2.4+)
    no_effect: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # "optimizer.beta2" -> "optimizer.betas"


def from_zoo(raw: dict[str, Any], then: Callable[[Translation], None] | None = None) -> Translation:
    """Our sections for a params mapping in any layout (ours passes through unchanged). ``then``
    sees a 2.4+ file once it is in our sections, before its zoo keys are translated and the zoo's
    defaults filled in (the command line's changes in our section paths)."""
    raw = copy.deepcopy(raw)
    if "trainer" in raw:
        out = _from_trainer(raw)
        if then is not None:
            then(out)
    elif _has_zoo_keys(raw):
        out = Translation(raw, "zoo")
    else:
        return Translation(raw, "sparsetrain")
    for name in ("train_input", "eval_input", "model", "optimizer", "runconfig"):
        section = out.raw.get(name)
        if isinstance(section, dict):
            _translate_section(name, section, out)
    _zoo_defaults(out.raw)
    return out


def _has_zoo_keys(raw: dict[str, Any]) -> bool:
    return any(
        isinstance(raw.get(name), dict) and any(k in markers for k in raw[name])
        for name, markers in ZOO_MARKERS.items()
    )


def _where(out: Translation, section: str, key: str) -> str:
    return out.origin.get(f"{section}.{key}", f"{section}.{key}")


# -- sections (all zoo layouts) ------------------------------------------------------------------


def _translate_section(name: str, section: dict[str, Any], out: Translation) -> None:
    """Zoo keys of one section -> ours, in place; no-effect keys removed and recorded."""
    if name == "model" and section.get("name", "gpt2") not in MODEL_NAMES:
        raise ConfigError(
            f"{_where(out, name, 'name')}: {section['name']!r} is not built here; choose {' or '.join(MODEL_NAMES)}"
        )
    for key in list(section):
        if key in NO_EFFECT.get(name, ()):
            out.no_effect.append(_where(out, name, key))
            del section[key]
        elif key in REFUSED.get(name, {}):
            built, why = REFUSED[name][key]
            value = section.pop(key)
            if value != built and not (built is None and value in (None, {}, [])):
                raise ConfigError(f"{_where(out, name, key)}: {value!r} is not valid here: {why} (only {built!r})")
    {"train_input": _input, "eval_input": _input, "model": _model, "optimizer": _optimizer,
     "runconfig": _runconfig}[name](name, section, out)


def _rename(section: dict, old: str, new: str, out: Translation, name: str, value: Any = None) -> None:
    if old not in section:
        return
    if new in section:
        raise ConfigError(f"{_where(out, name, old)}: the zoo's name of {name}.{new}, which is set too; give one of them")
    section[new] = section.pop(old) if value is None else value
    out.origin.setdefault(f"{name}.{new}", _where(out, name, old))
    if value is not None:
        del section[old]


def _input(name: str, section: dict, out: Translation) -> None:
    if "data_processor" in section:
        proc = section.pop("data_processor")
        if proc not in DATA_PROCESSORS:
            raise ConfigError(
                f"{_where(out, name, 'data_processor')}: {proc!r} is not built here; "
                f"choose {' or '.join(DATA_PROCESSORS)} (the zoo's HDF5 data)"
            )
        section.setdefault("source", "hdf5")
    elif ("data_dir" in section or "mixture" in section) and "source" not in section:
        section["source"] = "hdf5"
    if "micro_batch_size" in section:
        micro = section.pop("micro_batch_size")
        where = _where(out, name, "micro_batch_size")
        if micro in (None, "auto", "explore") or name == "eval_input":
            out.no_effect.append(where)  # the whole batch in one pass: the compiler's choice
        else:
            _grad_accum(section, micro, where, out)


def _grad_accum(section: dict, micro: Any, where: str, out: Translation) -> None:
    batch = section.get("batch_size")
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
        raise ConfigError(f"{where}: {micro!r} is not valid; a positive integer, auto, explore or null")
    if not isinstance(batch, int) or batch % micro:
        raise ConfigError(f"{where}: {micro} does not divide batch_size {batch!r}")
    optimizer = out.raw.setdefault("optimizer", {})
    if "grad_accum_steps" in optimizer:
        raise ConfigError(f"{where}: sets optimizer.grad_accum_steps, which is set too; give one of them")
    optimizer["grad_accum_steps"] = batch // micro
    out.origin["optimizer.grad_accum_steps"] = where


def _model(name: str, section: dict, out: Translation) -> None:
    kind = section.get("position_embedding_type")
    if kind is not None and kind != "learned":
        raise ConfigError(
            f"{_where(out, name, 'position_embedding_type')}: {kind!r} is not built here; only learned "
            "absolute position embeddings (GPT-2 / GPT-3)"
        )


def _optimizer(name: str, section: dict, out: Translation) -> None:
    kind = section.get("optimizer_type")
    if isinstance(kind, str):
        if optimizer_name(kind) is None:
            raise ConfigError(
                f"{_where(out, name, 'optimizer_type')}: {kind!r} is not built here; choose one of "
                f"{', '.join(OPTIMIZERS.values())} (any case)"
            )
        section["optimizer_type"] = optimizer_name(kind)
    if "betas" in section:
        betas = section["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise ConfigError(f"{_where(out, name, 'betas')}: expected [beta1, beta2], got {betas!r}")
        for i, key in enumerate(("beta1", "beta2")):
            if key in section:
                raise ConfigError(f"{_where(out, name, 'betas')}: sets {name}.{key}, which is set too; give one of them")
            section[key] = betas[i]
            out.origin.setdefault(f"{name}.{key}", _where(out, name, "betas"))
        del section["betas"]
    _rename(section, "epsilon", "eps", out, name)
    _rename(section, "weight_decay", "weight_decay_rate", out, name)
    _rename(section, "use_nesterov", "nesterov", out, name)
    lr = section.get("learning_rate")
    if isinstance(lr, dict):
        lr = section["learning_rate"] = [lr]
    if isinstance(lr, list):
        for i, phase in enumerate(lr):
            if isinstance(phase, dict):
                _phase(phase, f"{_where(out, name, 'learning_rate')}[{i}]", out)


def _phase(phase: dict, where: str, out: Translation) -> None:
    kind = phase.get("scheduler")
    if isinstance(kind, str):
        if scheduler_name(kind) is None:
            raise ConfigError(
                f"{where}.scheduler: {kind!r} is not built here; choose one of {', '.join(SCHEDULERS.values())} "
                "(any case, with or without LR)"
            )
        phase["scheduler"] = scheduler_name(kind)
    for old, new in PHASE_SYNONYMS.items():
        if old in phase:
            if new in phase:
                raise ConfigError(f"{where}.{old}: the zoo's name of {new}, which is set too; give one of them")
            phase[new] = phase.pop(old)
    for key in PHASE_NO_EFFECT:
        if key in phase:
            del phase[key]
            out.no_effect.append(f"{where}.{key}")


def _runconfig(name: str, section: dict, out: Translation) -> None:
    pass  # the zoo's runconfig keys are ours, or in NO_EFFECT / REFUSED


def _zoo_defaults(raw: dict[str, Any]) -> None:
    """The zoo's defaults where a zoo file is silent and ours differ."""
    model = raw.setdefault("model", {})
    if isinstance(model, dict):
        model.setdefault("nonlinearity", "gelu")
        if "loss_weight" in model and "loss_scaling" not in model:
            # Files of releases before loss_scaling existed (1.7): the loss was always
            # sum / batch_size * loss_weight.
            model["loss_scaling"] = "batch_size"
        std = model.get("initializer_range", 0.02)
        layers = model.get("num_hidden_layers", 12)
        if isinstance(std, (int, float)) and isinstance(layers, int) and layers > 0:
            normal = {"name": "truncated_normal", "mean": 0.0, "std": float(std)}
            if "initializer" not in model:
                model["initializer"] = normal
                model.setdefault("output_layer_initializer", {**normal, "std": std / math.sqrt(2 * layers)})
            model.setdefault("embedding_initializer", normal)
    optimizer = raw.setdefault("optimizer", {})
    if isinstance(optimizer, dict):
        optimizer.setdefault("eps", 1e-6)
        optimizer.setdefault("decay_embeddings", True)
    for name in ("train_input", "eval_input"):
        section = raw.get(name)
        if isinstance(section, dict) and section.get("source") == "hdf5":
            section.setdefault("max_sequence_length", None)  # the data's, as in the zoo


# -- the 2.4+ trainer layout ----------------------------------------------------------------------


def _from_trainer(raw: dict[str, Any]) -> Translation:
    """``trainer: {init, fit, validate, validate_all}`` -> our sections."""
    extra = [k for k in raw if k != "trainer"]
    if extra:
        raise ConfigError(f"{key_text(extra[0])}: a 2.4+ file (with trainer:) holds everything under trainer")
    if isinstance(raw["trainer"], list):
        raise ConfigError("trainer: a list of trainers is not built here; give one trainer mapping")
    trainer = _mapping(raw["trainer"], "trainer")
    _known(trainer, ("init", "fit", "validate", "validate_all"), "trainer")
    init = _mapping(trainer.get("init"), "trainer.init")
    out = Translation({}, "zoo trainer")
    sections = out.raw
    _known(init, ("model", "optimizer", "schedulers", "precision", "sparsity", "loop", "checkpoint", "logging",
                  "callbacks", "backend", "seed", "model_dir"), "trainer.init")
    sections["model"] = _mapping(init.get("model"), "trainer.init.model")
    for key in sections["model"]:
        out.origin[f"model.{key}"] = f"trainer.init.model.{key}"
    sections["optimizer"] = _trainer_optimizer(init, out)
    if init.get("sparsity") is not None:
        sections["sparsity"] = init["sparsity"]
        out.origin["sparsity"] = "trainer.init.sparsity"  # errors name the block where the file has it
    sections["runconfig"] = _trainer_runconfig(init, out)
    fit = _mapping(trainer.get("fit"), "trainer.fit")
    _known(fit, ("train_dataloader", "val_dataloader", "ckpt_path"), "trainer.fit")
    if fit.get("ckpt_path") is not None:
        raise ConfigError("trainer.fit.ckpt_path: give the checkpoint on the command line: --checkpoint_path")
    for ours, path, value in (("train_input", "trainer.fit.train_dataloader", fit.get("train_dataloader")),
                              ("eval_input", *_eval_loader(trainer, fit))):
        if value is not None:
            sections[ours] = dict(_mapping(value, path))
            for key in sections[ours]:
                out.origin[f"{ours}.{key}"] = f"{path}.{key}"
    return out


def _eval_loader(trainer: dict, fit: dict) -> tuple[str, Any]:
    """The evaluation data: ``fit.val_dataloader``, ``validate`` and ``validate_all`` must agree."""
    found: list[tuple[str, Any]] = []
    if fit.get("val_dataloader") is not None:
        found.append(("trainer.fit.val_dataloader", fit["val_dataloader"]))
    for name, key in (("validate", "val_dataloader"), ("validate_all", "val_dataloaders")):
        section = _mapping(trainer.get(name), f"trainer.{name}")
        _known(section, (key, "ckpt_path"), f"trainer.{name}")
        loaders = section.get(key)
        for i, loader in enumerate(loaders if isinstance(loaders, list) else [loaders]):
            if loader is not None:
                found.append((f"trainer.{name}.{key}" + (f"[{i}]" if isinstance(loaders, list) else ""), loader))
    for path, loader in found[1:]:
        if loader != found[0][1]:
            raise ConfigError(
                f"{path}: differs from {found[0][0]}; one evaluation dataset is built here (make them the same)"
            )
    return found[0] if found else ("trainer.fit.val_dataloader", None)


def _trainer_optimizer(init: dict, out: Translation) -> dict[str, Any]:
    optimizer: dict[str, Any] = {}
    spec = init.get("optimizer")
    if spec is not None:
        spec = _mapping(spec, "trainer.init.optimizer")
        if len(spec) != 1:
            raise ConfigError("trainer.init.optimizer: expected one optimizer, e.g. {AdamW: {betas: [0.9, 0.95]}}")
        (kind, settings), = spec.items()
        optimizer = {"optimizer_type": kind, **_mapping(settings, f"trainer.init.optimizer.{kind}")}
        out.origin["optimizer.optimizer_type"] = "trainer.init.optimizer"
        for key in optimizer:
            out.origin.setdefault(f"optimizer.{key}", f"trainer.init.optimizer.{kind}.{key}")
        if "lr" in optimizer or "learning_rate" in optimizer:
            lr = optimizer.pop("lr", None) if "lr" in optimizer else optimizer.pop("learning_rate")
            optimizer["learning_rate"] = lr
    schedulers = init.get("schedulers")
    if schedulers is not None:
        optimizer["learning_rate"] = _trainer_schedule(schedulers)
        out.origin["optimizer.learning_rate"] = "trainer.init.schedulers"
    precision = _mapping(init.get("precision"), "trainer.init.precision")
    for key, value in precision.items():
        if key == "max_gradient_norm":
            optimizer["max_gradient_norm"] = value
            out.origin["optimizer.max_gradient_norm"] = "trainer.init.precision.max_gradient_norm"
        elif key in TRAINER_NO_EFFECT["precision"]:
            out.no_effect.append(f"trainer.init.precision.{key}")
        else:
            raise ConfigError(
                f"trainer.init.precision.{key_text(key)}: unknown key"
                f"{closest(str(key), ('max_gradient_norm', *TRAINER_NO_EFFECT['precision']))}"
            )
    return optimizer


def _trainer_schedule(schedulers: Any) -> list[dict[str, Any]]:
    """``[{SequentialLR: {schedulers: [{LinearLR: {...}}, ...]}}]`` or ``[{LinearLR: {...}}]`` ->
    our phases (one parameter group: the zoo's per-group schedulers are not built)."""
    where = "trainer.init.schedulers"
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    if not isinstance(schedulers, list) or len(schedulers) != 1:
        raise ConfigError(f"{where}: expected one scheduler (a SequentialLR of phases, or one phase)")
    (kind, spec), = _mapping(schedulers[0], f"{where}[0]").items()
    if kind == "SequentialLR":
        spec = _mapping(spec, f"{where}[0].SequentialLR")
        _known(spec, ("schedulers", "milestones"), f"{where}[0].SequentialLR")
        phases = spec.get("schedulers") or []
        base = f"{where}[0].SequentialLR.schedulers"
    else:
        phases, base = [{kind: spec}], where
    out = []
    for i, phase in enumerate(phases):
        (name, settings), = _mapping(phase, f"{base}[{i}]").items()
        out.append({"scheduler": name, **_mapping(settings, f"{base}[{i}].{name}")})
    if kind == "SequentialLR" and spec.get("milestones") is not None:
        ends, total = [], 0
        for phase in out[:-1]:
            total += phase.get("total_iters", 0) if isinstance(phase.get("total_iters"), int) else 0
            ends.append(total)
        if list(spec["milestones"]) != ends:
            raise ConfigError(
                f"{where}[0].SequentialLR.milestones: {spec['milestones']!r} is not where the phases end ({ends}); "
                "the phases run one after another, each for its total_iters (drop milestones or make them agree)"
            )
    return out


def _trainer_runconfig(init: dict, out: Translation) -> dict[str, Any]:
    runconfig: dict[str, Any] = {}
    maps = {
        "loop": {"max_steps": "max_steps", "eval_frequency": "eval_frequency", "eval_steps": "eval_steps"},
        "checkpoint": {"steps": "checkpoint_steps", "save_initial_checkpoint": "save_initial_checkpoint",
                       "autoload_last_checkpoint": "autoload_last_checkpoint",
                       "disable_strict_checkpoint_loading": "disable_strict_checkpoint_loading"},
        "logging": {"log_steps": "log_steps"},
        "backend": {},
    }
    for sub, keys in maps.items():
        for key, value in _mapping(init.get(sub), f"trainer.init.{sub}").items():
            path = f"trainer.init.{sub}.{key}"
            if key in keys:
                runconfig[keys[key]] = value
                out.origin[f"runconfig.{keys[key]}"] = path
            elif key in TRAINER_NO_EFFECT.get(sub, ()):
                out.no_effect.append(path)
            else:
                raise ConfigError(f"{path}: unknown key{closest(str(key), (*keys, *TRAINER_NO_EFFECT.get(sub, ())))}")
    for key in ("seed", "model_dir"):
        if init.get(key) is not None:
            runconfig[key] = init[key]
            out.origin[f"runconfig.{key}"] = f"trainer.init.{key}"
    callbacks = init.get("callbacks") or []
    for i, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
        for name in _mapping(callback, f"trainer.init.callbacks[{i}]"):
            if name not in OBSERVING_CALLBACKS:
                raise ConfigError(
                    f"trainer.init.callbacks[{i}].{key_text(name)}: not built here (only callbacks that observe: "
                    f"{', '.join(OBSERVING_CALLBACKS)})"
                )
            out.no_effect.append(f"trainer.init.callbacks.{name}")
    return runconfig


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _known(section: dict, valid: tuple[str, ...], where: str) -> None:
    for key in section:
        if key not in valid:
            raise ConfigError(f"{where}.{key_text(key)}: unknown key{closest(str(key), valid)}")
