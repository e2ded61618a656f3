"""The params file: one YAML document with the sections of the reference model zoo.

Sections: ``train_input``, ``eval_input``, ``model``, ``optimizer``, ``runconfig`` and the optional
``sparsity`` block. Each section is a dataclass whose fields carry their documentation, valid
choices and ranges in ``metadata``; :func:`load_params` validates every key and raises a
:class:`~sparsetrain.errors.ConfigError` whose one-line message names the file, the section, the
key and what would be valid. ``--set section.key=value`` overrides are applied on top of the file
before validation, so they are checked the same way and end up in the resolved params.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsetrain.errors import ConfigError


def _f(default: Any, doc: str, **meta: Any) -> Any:
    """A dataclass field with documentation and validation metadata (choices, min, max)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


# Upper bounds on model sizes, far above any real model (GPT-3 175B: width 12288, 96 layers):
# larger values overflow torch's size arithmetic or take minutes just to build the module tree.
MAX_WIDTH = 1 << 16
MAX_LAYERS = 1024
MAX_FILTER = 1 << 20
MAX_POSITIONS = 1 << 20
MAX_VOCAB = 1 << 24


@dataclass(kw_only=True)
class InputParams:
    """Where training or evaluation tokens come from, and how they are batched."""

    source: str = _f(
        "stdlib",
        "stdlib (the running Python's standard library sources) | text | jsonl | shards",
        choices=("stdlib", "text", "jsonl", "shards"),
    )
    data_path: str | None = _f(None, "file, directory or glob (text, jsonl); directory (shards)")
    text_field: str = _f("text", "field of each JSON Lines record that holds the document")
    tokenizer: str = _f("byte", "byte | bpe (trained locally, saved in model_dir) | path to tokenizer.json")
    bpe_vocab_size: int = _f(4096, "vocabulary size of a locally trained BPE", min=257, max=MAX_VOCAB)
    split: str | None = _f(
        None, "train | eval | all; default: train for train_input, eval for eval_input",
        choices=("train", "eval", "all"),
    )
    eval_fraction: float = _f(0.05, "share of files (or documents) in the eval split", min=0.0, max=1.0)
    batch_size: int = _f(16, "sequences per optimizer step (all micro-batches together)", min=1)
    max_sequence_length: int = _f(128, "tokens per sequence (context length)", min=1)
    shuffle: bool = _f(True, "random windows (true) or consecutive windows (false)")
    section: str = field(default="train_input", repr=False, metadata={"internal": True})


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, max_position_embeddings=256),
    "gpt2-small": dict(hidden_size=768, num_hidden_layers=12, num_heads=12, max_position_embeddings=1024, vocab_size=50257),
    "gpt2-medium": dict(hidden_size=1024, num_hidden_layers=24, num_heads=16, max_position_embeddings=1024, vocab_size=50257),
    "gpt2-large": dict(hidden_size=1280, num_hidden_layers=36, num_heads=20, max_position_embeddings=1024, vocab_size=50257),
    "gpt2-xl": dict(hidden_size=1600, num_hidden_layers=48, num_heads=25, max_position_embeddings=1024, vocab_size=50257),
    "gpt3-xl": dict(hidden_size=2048, num_hidden_layers=24, num_heads=16, max_position_embeddings=2048, vocab_size=50257),
}


@dataclass(kw_only=True)
class ModelParams:
    """A GPT-2 / GPT-3 style decoder. Keys given beside ``preset`` override the preset."""

    preset: str | None = _f(None, "named model size", choices=tuple(PRESETS))
    hidden_size: int = _f(128, "width d", min=1, max=MAX_WIDTH)
    num_hidden_layers: int = _f(4, "number of transformer blocks", min=1, max=MAX_LAYERS)
    num_heads: int = _f(4, "attention heads; must divide hidden_size", min=1, max=MAX_WIDTH)
    filter_size: int | None = _f(None, "MLP inner width; default 4 * hidden_size", min=1, max=MAX_FILTER)
    max_position_embeddings: int = _f(256, "longest sequence the model accepts", min=1, max=MAX_POSITIONS)
    vocab_size: int | None = _f(None, "default: the tokenizer's vocabulary size", min=1, max=MAX_VOCAB)
    dropout_rate: float = _f(0.0, "dropout after embeddings, attention and MLP", min=0.0, max=1.0)
    share_embedding_weights: bool = _f(True, "tie the LM head to the token embedding")
    use_bias: bool = _f(True, "biases in linear layers and layer norms")
    layer_norm_epsilon: float = _f(1e-5, "layer norm epsilon", min=0.0)
    initializer_range: float = _f(0.02, "std of the normal weight initialisation", min=0.0)




@dataclass(kw_only=True)
class OptimizerParams:
    """Optimizer, learning-rate schedule, clipping and gradient accumulation."""

    optimizer_type: str = _f("AdamW", "AdamW | Adam | SGD", choices=("AdamW", "Adam", "SGD"))
    learning_rate: float | list = _f(
        1e-3,
        "a constant, or a list of schedule phases run one after another, each "
        "{scheduler: Linear | CosineDecay | Constant, initial_learning_rate, end_learning_rate, total_iters}",
    )
    weight_decay_rate: float = _f(0.0, "decoupled (AdamW) or L2 weight decay; not on norms, biases, embeddings", min=0.0)
    max_gradient_norm: float | None = _f(None, "clip the global gradient norm to this value", min=0.0)
    beta1: float = _f(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = _f(0.999, "Adam beta2", min=0.0, max=1.0)
    eps: float = _f(1e-8, "Adam epsilon", min=0.0)
    momentum: float = _f(0.0, "SGD momentum", min=0.0)
    nesterov: bool = _f(False, "SGD Nesterov momentum")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step; must divide batch_size", min=1)
    packed_state: bool = _f(
        True, "with a sparsity block: keep the optimizer state of sparsified weights for kept entries only"
    )


SCHEDULERS = ("Linear", "CosineDecay", "Constant")


@dataclass(kw_only=True)
class RunConfig:
    """How long to train, how often to log, evaluate and checkpoint, and on what device."""

    max_steps: int = _f(1000, "optimizer steps to train for", min=0)
    checkpoint_steps: int = _f(0, "write a checkpoint every N steps (0: only at max_steps)", min=0)
    log_steps: int = _f(10, "log metrics every N steps", min=1)
    eval_steps: int | None = _f(None, "batches per evaluation (default: the whole eval split)", min=1)
    eval_frequency: int = _f(0, "in train_and_eval mode, evaluate every N steps (0: only at the end)", min=0)
    seed: int = _f(0, "seeds initialisation, dropout and batch sampling", min=0, max=2**63 - 1)
    keep_checkpoints: int | None = _f(None, "keep only the newest N checkpoints (default: all)", min=1)
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16", choices=("auto", "fp32", "bf16"))
    compile: str | bool = _f("auto", "torch.compile the model: auto (on CUDA only) | true | false")
    compile_mode: str = _f(
        "auto",
        "torch.compile mode: auto (reduce-overhead when layers run on the block-sparse kernels in a single "
        "process, else default) | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs",
        choices=("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    nonfinite: str = _f(
        "stop", "on a non-finite loss or gradient: stop (no checkpoint after it) | skip (drop that step's update)",
        choices=("stop", "skip"),
    )
    max_skipped_steps: int = _f(10, "with nonfinite: skip, stop after more skipped steps than this", min=0)
    distributed: str = _f(
        "auto", "under torchrun: auto (DDP when more than one process) | none | ddp | fsdp (FSDP2 fully_shard)",
        choices=("auto", "none", "ddp", "fsdp"),
    )
    attention: str = _f(
        "auto", "scaled-dot-product attention kernel to prefer: auto (PyTorch's choice) | flash | cudnn | efficient | math",
        choices=("auto", "flash", "cudnn", "efficient", "math"),
    )
    sparse_kernels: str = _f(
        "auto",
        "block-sparse weights: auto (skip dead blocks with the Triton kernels on CUDA in bf16/fp16) | off (masked dense)",
        choices=("auto", "off"),
    )
    progress: bool = _f(True, "show a progress bar on the terminal")


@dataclass(kw_only=True)
class Params:
    train_input: InputParams = field(default_factory=InputParams)
    eval_input: InputParams = field(default_factory=lambda: InputParams(section="eval_input", shuffle=False))
    model: ModelParams = field(default_factory=ModelParams)
    optimizer: OptimizerParams = field(default_factory=OptimizerParams)
    runconfig: RunConfig = field(default_factory=RunConfig)
    sparsity: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, ready for YAML or a checkpoint (``torch.load(weights_only=True)`` safe)."""
        out: dict[str, Any] = {}
        for name in ("train_input", "eval_input", "model", "optimizer", "runconfig"):
            section = getattr(self, name)
            out[name] = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if not f.metadata.get("internal")}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity
        return out


SECTIONS: dict[str, type] = {
    "train_input": InputParams,
    "eval_input": InputParams,
    "model": ModelParams,
    "optimizer": OptimizerParams,
    "runconfig": RunConfig,
}


def _key_text(key: Any) -> str:
    """A key as written in an error message: plain if it is a simple name, else its repr (one line)."""
    text = str(key)
    if isinstance(key, str) and text.isprintable() and text.strip() == text and text and len(text) <= 80:
        return text
    return repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."


def _closest(name: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; accept ints for floats and '1e-3' strings."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: a value is required ({_type_name(tp)})")
    for arg in args:
        if arg is bool and isinstance(value, bool):
            return value
        if arg is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if arg is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if arg is str and isinstance(value, str):
            return value
        if arg is list and isinstance(value, list):
            return value
    if float in args and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; users mean the number.
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _check_range(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    if value is None or isinstance(value, (bool, list)):
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not valid; choose one of {', '.join(map(str, choices))}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise ConfigError(f"{where}: {value!r} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{where}: {value!r} is above the maximum {hi}")


def build_section(cls: type, raw: Any, where: str, **extra: Any) -> Any:
    """Validate one section's mapping and build its dataclass."""
    section = where
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(extra)
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{section}.{_key_text(key)}: unknown key{_closest(str(key), fields)}")
        choices = fields[key].metadata.get("choices")
        if choices is not None and isinstance(value, bool) and not isinstance(choices[0], bool):
            # YAML 1.1 reads on/off/yes/no as booleans: name the valid words instead.
            raise ConfigError(
                f"{section}.{key}: {value!r} is not valid; choose one of {', '.join(map(str, choices))} "
                "(YAML reads unquoted on/off/yes/no as true/false: quote the word)"
            )
        values[key] = _coerce(value, hints[key], f"{section}.{key}")
        _check_range(values[key], fields[key].metadata, f"{section}.{key}")
    return cls(**values)


def _build_model(raw: Any) -> ModelParams:
    raw = dict(raw or {}) if isinstance(raw, dict) or raw is None else raw
    if isinstance(raw, dict) and raw.get("preset") is not None:
        preset = raw["preset"]
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"model.preset: {preset!r} is not valid; choose one of {', '.join(PRESETS)}")
        raw = {**PRESETS[preset], **raw}
    model = build_section(ModelParams, raw, "model")
    if model.hidden_size % model.num_heads:
        raise ConfigError(
            f"model.num_heads: {model.num_heads} does not divide hidden_size {model.hidden_size}"
        )
    return model


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
                raise ConfigError(f"{where}.{_key_text(key)}: unknown key{_closest(str(key), keys)}")
        kind = phase.get("scheduler")
        if kind not in SCHEDULERS:
            raise ConfigError(f"{where}.scheduler: {kind!r} is not valid; choose one of {', '.join(SCHEDULERS)}")
        for key in ("initial_learning_rate", "end_learning_rate"):
            if key in phase:
                phase[key] = _coerce(phase[key], float, f"{where}.{key}")
                _check_range(phase[key], {"min": 0.0}, f"{where}.{key}")
        if "initial_learning_rate" not in phase:
            raise ConfigError(f"{where}.initial_learning_rate: required")
        last = i == len(lr) - 1
        if "total_iters" not in phase and not last:
            raise ConfigError(f"{where}.total_iters: required on every phase but the last")
        if "total_iters" in phase:
            phase["total_iters"] = _coerce(phase["total_iters"], int, f"{where}.total_iters")
            _check_range(phase["total_iters"], {"min": 1}, f"{where}.total_iters")


def params_from_dict(raw: Any) -> Params:
    """Validate a whole params mapping (already parsed from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping with sections {', '.join([*SECTIONS, 'sparsity'])}")
    valid = [*SECTIONS, "sparsity"]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{_key_text(key)}: unknown section{_closest(str(key), valid)}")
    train = build_section(InputParams, raw.get("train_input"), "train_input", section="train_input")
    eval_raw = raw.get("eval_input")
    if isinstance(eval_raw, dict) or eval_raw is None:
        eval_raw = {"shuffle": False, **(eval_raw or {})}  # evaluation reads consecutive windows
    eval_ = build_section(InputParams, eval_raw, "eval_input", section="eval_input")
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
    sparsity = raw.get("sparsity")
    if sparsity is not None:
        from sparsetrain.sparsity.config import parse_sparsity

        parse_sparsity(sparsity)  # structure only; parameter names are checked once the model exists
    params = Params(
        train_input=train, eval_input=eval_, model=_build_model(raw.get("model")),
        optimizer=optimizer, runconfig=runconfig, sparsity=sparsity or None,
    )
    for inp in (params.train_input, params.eval_input):
        if inp.max_sequence_length > params.model.max_position_embeddings:
            raise ConfigError(
                f"{inp.section}.max_sequence_length: {inp.max_sequence_length} exceeds "
                f"model.max_position_embeddings {params.model.max_position_embeddings}"
            )
    return params


def _parse_compile(value: str | bool) -> str | bool:
    if isinstance(value, bool) or value == "auto":
        return value
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ConfigError(f"runconfig.compile: {value!r} is not valid; choose auto, true or false")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML)."""
    path, sep, value = text.partition("=")
    keys = path.strip().split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. runconfig.max_steps=100")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except Exception:  # a YAML error, or a constructor failing on a bad tagged value
        parsed = value
    return keys, parsed


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``--set`` overrides to a raw params mapping (in place) and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {key} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; errors name the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML params file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read params file ({e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except Exception as e:  # safe_load runs no user code: a constructor failed on a bad
        # tagged value (a date 2001-02-30, "!!int x", "!!int ''") with a plain Python error
        raise ConfigError(f"{path}: YAML value error: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_params(path: str | Path, overrides: typing.Sequence[str] = ()) -> Params:
    """Read, override and validate a params file. Errors are prefixed with the file name."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    try:
        return params_from_dict(apply_overrides(raw, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_params(params: Params, overrides: typing.Sequence[str] = ()) -> str:
    """The resolved params as YAML, with the command-line overrides noted at the top."""
    header = "# resolved params written by sparsetrain\n"
    if overrides:
        header += "".join(f"# --set {o}\n" for o in overrides)
    return header + yaml.safe_dump(params.to_dict(), sort_keys=False)
