"""The params file: one YAML document with the sections of the reference model zoo, read once.

Sections: ``train_input``, ``eval_input``, ``model``, ``optimizer``, ``runconfig``
(:mod:`sparsetrain.config.sections`) and the optional ``sparsity`` block, parsed into a typed
:class:`~sparsetrain.config.sparsity.SparsityConfig`. :func:`load_params` validates every key and raises a
:class:`~sparsetrain.errors.ConfigError` whose one-line message names the file, the section, the
key and what would be valid. ``--set section.key=value`` overrides are applied on top of the file
before validation, so they are checked the same way and end up in the resolved params; an error
about a key the command line changed names the flag (``--set runconfig.max_step: ...``) instead
of the file, and a value YAML cannot read is an error, never the text as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsetrain.config.builtin import builtin_path
from sparsetrain.config.dynamic import check_levels
from sparsetrain.config.fields import build_section, check_range, closest, coerce, key_text
from sparsetrain.config.hf_model import merge_init_from
from sparsetrain.config.overrides import (
    FlagError,
    apply_overrides,
    apply_unset,
    flag_keys,
    naming_flag,
    one_line,
    parse_override,
)
from sparsetrain.config.sections import (
    INITIALIZERS,
    PRESETS,
    SCHEDULERS,
    InputParams,
    ModelParams,
    OptimizerParams,
    RunConfig,
)
from sparsetrain.config.sparsity import SparsityConfig, parse_sparsity
from sparsetrain.config.zoo import Translation, from_zoo
from sparsetrain.config.zoo_keys import optimizer_name, scheduler_name
from sparsetrain.errors import ConfigError, UserError

log = logging.getLogger("sparsetrain")


@dataclass(kw_only=True)
class Params:
    """A whole params file, validated. ``path`` is the file it was read from (None when built from a
    mapping): errors found later, once the model exists, name it too."""

    train_input: InputParams = field(default_factory=InputParams)
    eval_input: InputParams = field(default_factory=lambda: InputParams(section="eval_input", shuffle=False))
    model: ModelParams = field(default_factory=ModelParams)
    optimizer: OptimizerParams = field(default_factory=OptimizerParams)
    runconfig: RunConfig = field(default_factory=RunConfig)
    sparsity: SparsityConfig | None = None
    path: Path | None = field(default=None, compare=False, repr=False)
    layout: str = field(default="sparsetrain", compare=False, repr=False)  # or "zoo", "zoo trainer"
    no_effect: tuple[str, ...] = field(default=(), compare=False, repr=False)  # zoo keys, as written
    origin: dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # our key -> as written
    # Keys the command line changed, as written there -> the flag ("--set", "--unset"): errors
    # about them name the flag, not the file (see :func:`as_written`).
    flags: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, ready for YAML or a checkpoint (``torch.load(weights_only=True)`` safe)."""
        out: dict[str, Any] = {}
        for name in ("train_input", "eval_input", "model", "optimizer", "runconfig"):
            section = getattr(self, name)
            out[name] = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if not f.metadata.get("internal")}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity.to_params()
        return out


SECTIONS: dict[str, type] = {
    "train_input": InputParams,
    "eval_input": InputParams,
    "model": ModelParams,
    "optimizer": OptimizerParams,
    "runconfig": RunConfig,
}


def _build_model(raw: Any) -> ModelParams:
    raw = dict(raw or {}) if isinstance(raw, dict) or raw is None else raw
    if isinstance(raw, dict) and raw.get("preset") is not None:
        preset = raw["preset"]
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"model.preset: {preset!r} is not valid; choose one of {', '.join(PRESETS)}")
        raw = {**PRESETS[preset], **raw}
    model = build_section(ModelParams, raw, "model")
    for key in ("initializer", "output_layer_initializer", "embedding_initializer"):
        setattr(model, key, _check_initializer(getattr(model, key), f"model.{key}"))
    if model.loss_scaling == "num_tokens" and model.loss_weight != 1.0:
        raise ConfigError(
            f"model.loss_weight: {model.loss_weight} with loss_scaling num_tokens; as in the zoo (2.1+), "
            "loss_weight applies with loss_scaling batch_size only (use 1.0, or batch_size)"
        )
    if model.hidden_size % model.num_heads:
        raise ConfigError(
            f"model.num_heads: {model.num_heads} does not divide hidden_size {model.hidden_size}"
        )
    return model


def _check_initializer(spec: str | dict | None, where: str) -> dict | None:
    """A zoo initializer: a name or ``{name, <its numbers>}``, returned as a mapping."""
    if spec is None:
        return None
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.get("name")
    if name not in INITIALIZERS:
        raise ConfigError(f"{where}.name: {name!r} is not built here; choose one of {', '.join(INITIALIZERS)}")
    valid = ("name", *INITIALIZERS[name])
    for key, value in spec.items():
        if key not in valid:
            raise ConfigError(f"{where}.{key_text(key)}: not a key of the {name} initializer{closest(str(key), valid)}")
        if key != "name":
            spec[key] = coerce(value, float, f"{where}.{key}")
            check_range(spec[key], {"min": 0.0} if key in ("std", "gain") else {}, f"{where}.{key}")
    return spec


def _check_schedule(lr: float | list) -> None:
    if isinstance(lr, float):
        if lr < 0:
            raise ConfigError(f"optimizer.learning_rate: {lr!r} is negative")
        return
    if not lr:
        raise ConfigError("optimizer.learning_rate: an empty schedule; give a number or a list of phases")
    keys = ("scheduler", "initial_learning_rate", "end_learning_rate", "total_iters")
    for i, phase in enumerate(lr):
        where = f"optimizer.learning_rate[{i}]"
        if not isinstance(phase, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(keys)}")
        for key in phase:
            if key not in keys:
                raise ConfigError(f"{where}.{key_text(key)}: unknown key{closest(str(key), keys)}")
        kind = phase.get("scheduler")
        if kind not in SCHEDULERS:
            raise ConfigError(f"{where}.scheduler: {kind!r} is not valid; choose one of {', '.join(SCHEDULERS)}")
        for key in ("initial_learning_rate", "end_learning_rate"):
            if key in phase:
                phase[key] = coerce(phase[key], float, f"{where}.{key}")
                check_range(phase[key], {"min": 0.0}, f"{where}.{key}")
        if "initial_learning_rate" not in phase:
            raise ConfigError(f"{where}.initial_learning_rate: required")
        last = i == len(lr) - 1
        if "total_iters" not in phase and not last:
            raise ConfigError(f"{where}.total_iters: required on every phase but the last")
        if "total_iters" in phase:
            phase["total_iters"] = coerce(phase["total_iters"], int, f"{where}.total_iters")
            check_range(phase["total_iters"], {"min": 1}, f"{where}.total_iters")


def params_from_dict(raw: Any, overrides: typing.Sequence[str] = (), unset: typing.Sequence[str] = ()) -> Params:
    """Validate a whole params mapping (already parsed from YAML), in our layout or any of the
    model zoo's (:mod:`sparsetrain.config.zoo`), with ``--unset`` and ``--set`` changes; errors
    name the key as the file wrote it. In a 2.4+ zoo file (``trainer:``) a change may name the
    file's keys (``trainer.init.loop.max_steps=10``) or our sections (``runconfig.max_steps=10``):
    the latter apply once the file is in our sections, before the zoo's defaults are filled in
    (so an initializer scaled by the layer count sees the new count). One key changed both ways
    is an error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping with sections {', '.join([*SECTIONS, 'sparsity'])}")
    ours = (*SECTIONS, "sparsity")
    trainer = "trainer" in raw
    late_set = [o for o in overrides if trainer and parse_override(o)[0][0] in ours]
    late_unset = [u for u in unset if trainer and u.split(".")[0] in ours]
    early_set = [o for o in overrides if o not in late_set]
    early = {".".join(parse_override(o)[0]) for o in early_set} | {u for u in unset if u not in late_unset}
    apply_overrides(apply_unset(raw, [u for u in unset if u not in late_unset]), early_set)

    def late(translation: Translation) -> None:
        for path in [*late_unset, *(".".join(parse_override(o)[0]) for o in late_set)]:
            written = translation.origin.pop(path, None)
            if written in early:
                raise ConfigError(
                    f"{path}: changed on the command line both as {path} and as {written} (the file's "
                    "name of the same key); give one of them"
                )
        apply_overrides(apply_unset(translation.raw, late_unset), late_set)

    translation = from_zoo(raw, late)
    try:
        params = _validate(translation.raw)
    except ConfigError as e:
        raise ConfigError(_as_written(str(e), translation.origin)) from None
    params.layout, params.no_effect = translation.layout, tuple(translation.no_effect)
    params.origin = dict(translation.origin)
    return params


def _as_written(message: str, origin: dict[str, str]) -> str:
    """An error about ``optimizer.beta2`` names ``optimizer.betas`` when the file wrote that."""
    for ours in sorted(origin, key=len, reverse=True):
        if message.startswith(ours) and message[len(ours) : len(ours) + 1] in (":", ".", "[", " "):
            return origin[ours] + message[len(ours) :]
    return message


def _canonical_names(raw: dict) -> None:
    """Optimizer and scheduler names in any case, as the zoo accepts them."""
    optimizer = raw.get("optimizer")
    if not isinstance(optimizer, dict):
        return
    kind = optimizer.get("optimizer_type")
    if isinstance(kind, str) and optimizer_name(kind):
        optimizer["optimizer_type"] = optimizer_name(kind)
    phases = optimizer.get("learning_rate")
    for phase in phases if isinstance(phases, list) else []:
        name = phase.get("scheduler") if isinstance(phase, dict) else None
        if isinstance(name, str) and scheduler_name(name):
            phase["scheduler"] = scheduler_name(name)


def _validate(raw: dict) -> Params:
    _canonical_names(raw)
    raw = merge_init_from(raw, PRESETS)  # model.init_from: hf:DIR sets the model's keys (config.hf_model)
    valid = [*SECTIONS, "sparsity"]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{key_text(key)}: unknown section{closest(str(key), valid)}")
    train = build_section(InputParams, raw.get("train_input"), "train_input", section="train_input")
    eval_raw = raw.get("eval_input")
    if isinstance(eval_raw, dict) or eval_raw is None:
        eval_raw = {"shuffle": False, **(eval_raw or {})}  # evaluation reads consecutive windows
    eval_ = _train_tokenizer(build_section(InputParams, eval_raw, "eval_input", section="eval_input"), eval_raw, train)
    optimizer = build_section(OptimizerParams, raw.get("optimizer"), "optimizer")
    _check_schedule(optimizer.learning_rate)
    if train.batch_size % optimizer.grad_accum_steps:
        raise ConfigError(
            f"optimizer.grad_accum_steps: {optimizer.grad_accum_steps} does not divide "
            f"train_input.batch_size {train.batch_size}"
        )
    runconfig = build_section(RunConfig, raw.get("runconfig"), "runconfig")
    runconfig.compile = _parse_compile(runconfig.compile)
    if not (runconfig.device in ("auto", "cpu", "cuda") or runconfig.device.startswith("cuda:")):
        raise ConfigError(f"runconfig.device: {runconfig.device!r} is not valid; choose auto, cpu, cuda or cuda:N")
    # Structure only: parameter names are resolved once the model exists (sparsity.select).
    sparsity = parse_sparsity(raw.get("sparsity"))
    for group in sparsity.groups if sparsity is not None else ():
        if group.dynamic is not None:
            check_levels(group.dynamic, runconfig.max_steps)
    params = Params(
        train_input=train, eval_input=eval_, model=_build_model(raw.get("model")),
        optimizer=optimizer, runconfig=runconfig, sparsity=sparsity,
    )
    for inp in (params.train_input, params.eval_input):
        if inp.max_sequence_length is None and inp.source != "hdf5":
            raise ConfigError(f"{inp.section}.max_sequence_length: required (only hdf5 data carries its own)")
        if inp.max_sequence_length is not None and inp.max_sequence_length > params.model.max_position_embeddings:
            raise ConfigError(
                f"{inp.section}.max_sequence_length: {inp.max_sequence_length} exceeds "
                f"model.max_position_embeddings {params.model.max_position_embeddings}"
            )
    return params


# eval_input keys that evaluation takes from train_input: the eval split is encoded with the
# tokenizer the model is trained with (``data.load_tokenizer(train_input)``), as ids of another
# vocabulary would be scored against the wrong embeddings.
TRAIN_TOKENIZER_KEYS = ("tokenizer", "bpe_vocab_size")


def _train_tokenizer(eval_: InputParams, eval_raw: Any, train: InputParams) -> InputParams:
    """``eval_input`` with train_input's tokenizer keys, so the resolved params (``convert-params``,
    ``model_dir/params.yaml``) show the tokenizer evaluation really uses rather than
    eval_input's defaults (``byte``, 4096). An eval_input value that would be ignored because it
    differs is an error: ``bpe_vocab_size`` only where train_input trains a BPE, as elsewhere
    neither section reads it."""
    given = eval_raw if isinstance(eval_raw, dict) else {}
    for key in TRAIN_TOKENIZER_KEYS:
        ours, theirs = getattr(eval_, key), getattr(train, key)
        matters = key == "tokenizer" or train.tokenizer == "bpe"
        if key in given and matters and ours != theirs:
            raise ConfigError(
                f"eval_input.{key}: {ours!r} differs from train_input.{key} {theirs!r}; evaluation encodes "
                f"with train_input's tokenizer (the model's vocabulary): leave eval_input.{key} out or make "
                "it the same"
            )
        setattr(eval_, key, theirs)
    return eval_


def _parse_compile(value: str | bool) -> str | bool:
    if isinstance(value, bool) or value == "auto":
        return value
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ConfigError(f"runconfig.compile: {value!r} is not valid; choose auto, true or false")


class _KeyCheckingLoader(yaml.SafeLoader):
    """PyYAML's safe loader that notes keys given twice in one mapping (key, line)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[Any, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
                if key in seen and key != "<<":
                    self.duplicates.append((key, key_node.start_mark.line + 1))
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; errors name the file and the line. A key given twice in one mapping is
    a warning (YAML loaders keep the last one silently; the zoo's files load as they always did)."""
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO would block for ever
        raise ConfigError(f"{path}: not a regular file (a FIFO, device or socket), expected a YAML params file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML params file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read params file ({e})") from None
    try:
        loader = _KeyCheckingLoader(text)
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
        for key, line in loader.duplicates:
            log.warning("%s:%d: key %r given twice in one mapping; the last one is used", path, line, key)
        return value
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except Exception as e:  # safe_load runs no user code: a constructor failed on a bad
        # tagged value (a date 2001-02-30, "!!int x", "!!int ''") with a plain Python error
        raise ConfigError(f"{path}: YAML value error: {one_line(e)}") from None


def load_params(path: str | Path, overrides: typing.Sequence[str] = (), unset: typing.Sequence[str] = ()) -> Params:
    """Read, override and validate a params file (ours, or the model zoo's in any layout). Errors
    are prefixed with the file name, or with the flag for a key that ``--set`` / ``--unset`` changed.
    ``builtin:NAME`` reads a config shipped with the package (:mod:`sparsetrain.config.builtin`)."""
    path = builtin_path(path)
    raw = read_yaml(path)
    if raw is None:  # an empty file is a mistake (a truncated copy, the wrong path), not "defaults"
        raise ConfigError(f"{path}: the params file is empty; expected a mapping with sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    with naming_file(path, overrides, unset):
        params = params_from_dict(raw, overrides, unset)
    params.path = path
    params.flags = flag_keys(overrides, unset)
    for inp in (params.train_input, params.eval_input):
        inp.params_dir = str(path.resolve().parent)
    return params


@contextlib.contextmanager
def as_written(params: Params) -> Iterator[None]:
    """Errors about a params key raised inside (the checks that need the model or the data) name
    the key as the file wrote it (``trainer.fit.train_dataloader.data_dir`` in a 2.4+ zoo file);
    config errors also name the params file first, as :func:`naming_file` does, or the flag when
    the command line set that key."""
    try:
        yield
    except UserError as e:
        message = _as_written(str(e), params.origin)
        flagged = naming_flag(message, params.flags)
        if flagged is not None:
            raise (FlagError if isinstance(e, ConfigError) else type(e))(flagged) from None
        if isinstance(e, ConfigError) and params.path is not None:
            message = f"{params.path}: {message}"
        if message == str(e):
            raise
        raise type(e)(message) from None


@contextlib.contextmanager
def naming_file(
    path: Path | None, overrides: typing.Sequence[str] = (), unset: typing.Sequence[str] = ()
) -> Iterator[None]:
    """Config errors raised inside name the params file ``path`` first (nothing when None), or
    the flag, when the key at fault came from ``overrides`` (``--set``) or ``unset``: the file
    does not hold that value, and blaming it sends the user to the wrong place."""
    try:
        yield
    except FlagError:
        raise
    except ConfigError as e:
        flagged = naming_flag(str(e), flag_keys(overrides, unset))
        if flagged is not None:
            raise FlagError(flagged) from None
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from None


def dump_params(params: Params, overrides: typing.Sequence[str] = (), unset: typing.Sequence[str] = ()) -> str:
    """The resolved params as YAML in our layout, with where they came from at the top: the file
    and its layout, the command-line changes, and the zoo keys that have no effect here."""
    header = "# resolved params written by sparsetrain\n"
    if params.path is not None:
        header += f"# from {params.path} ({params.layout} layout)\n"
    header += "".join(f"# --unset {u}\n" for u in unset)
    if overrides:
        header += "".join(f"# --set {o}\n" for o in overrides)
    if params.no_effect:
        header += f"# zoo keys with no effect on GPUs (not written below): {', '.join(params.no_effect)}\n"
    return header + yaml.safe_dump(params.to_dict(), sort_keys=False)
