"""``model.init_from: hf:DIR``: the model keys a Hugging Face GPT-2 directory sets, merged into a
params file's ``model:`` section before it is validated (one parse: resumes read them the same way).

A directory ``sparsetrain export`` wrote carries our own model keys in ``sparsetrain.json`` (so
``use_bias: false`` or unscaled attention come back as they were); any other GPT-2 directory is
read from ``config.json`` (``GPT2Config``). The keys that define the function the model computes
(:data:`FUNCTION_KEYS`) come from the directory; a params file may repeat them only with the same
value. Training choices stay the params file's: dropout (GPT-2's config says 0.1; ours defaults to
0.0, set ``model.dropout_rate`` to fine-tune with it), the initializers, the loss scaling.

The tokenizer: with ``train_input.tokenizer`` left unset, the directory's ``tokenizer.json`` (our
exports of byte-tokenized runs: ``byte`` again, the same ids). A directory without one needs the
tokenizer named: a pre-trained vocabulary read with another tokenizer's ids trains nonsense.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsetrain.errors import ConfigError

PREFIX = "hf:"
EXPORT_FORMAT = "sparsetrain-hf-gpt2"  # the "format" of sparsetrain.json (hf.export writes it)
FUNCTION_KEYS = (
    "hidden_size", "num_hidden_layers", "num_heads", "filter_size", "max_position_embeddings", "vocab_size",
    "nonlinearity", "layer_norm_epsilon", "share_embedding_weights", "attention_type", "use_bias",
    "use_projection_bias_in_attention", "use_ffn_bias_in_attention", "use_ffn_bias", "use_bias_in_output",
)
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu",
                "silu": "silu", "swish": "silu"}
WHERE = "model.init_from"


def source_dir(spec: Any) -> Path:
    """The directory of an ``init_from`` value (``hf:DIR``), checked to hold a ``config.json``."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX) or not spec[len(PREFIX):].strip():
        raise ConfigError(f"{WHERE}: {spec!r} is not valid; give hf:DIR, a Hugging Face GPT-2 directory on disk")
    path = Path(spec[len(PREFIX):]).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(f"{WHERE}: {path} {what}; give a directory saved by save_pretrained or sparsetrain export")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{WHERE}: {path} holds no config.json; is it a Hugging Face model directory?")
    return path


def is_hf_dir(path: Path | str | None) -> bool:
    """A directory holding a ``config.json``: what ``--checkpoint_path`` may name instead of a file."""
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()



def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{WHERE}: {path}: cannot read it ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{WHERE}: {path}: expected a JSON object")
    return value


def exported_info(path: Path) -> dict[str, Any] | None:
    """``sparsetrain.json`` of a directory ``sparsetrain export`` wrote, else None."""
    info_path = path / "sparsetrain.json"
    if not info_path.is_file():
        return None
    info = read_json(info_path)
    return info if info.get("format") == EXPORT_FORMAT else None


def model_keys(path: Path) -> dict[str, Any]:
    """The function-defining model keys of directory ``path`` (see the module docstring)."""
    info = exported_info(path)
    if info is not None and isinstance(info.get("model"), dict):
        return {k: info["model"][k] for k in FUNCTION_KEYS if k in info["model"]}
    return from_gpt2_config(read_json(path / "config.json"), path / "config.json")


def from_gpt2_config(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """Our model keys for a ``GPT2Config`` mapping; what we cannot compute is refused in one line."""
    if cfg.get("model_type") != "gpt2":
        raise ConfigError(f"{WHERE}: {where}: model_type {cfg.get('model_type')!r}; only GPT-2 ('gpt2') models are read")
    act = cfg.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{WHERE}: {where}: activation_function {act!r} is not built here; "
                          f"supported: {', '.join(_ACTIVATIONS)}")
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError(f"{WHERE}: {where}: scale_attn_by_inverse_layer_idx: true is not built here")
    try:
        width = int(cfg["n_embd"])
        return {
            "hidden_size": width,
            "num_hidden_layers": int(cfg["n_layer"]),
            "num_heads": int(cfg["n_head"]),
            "filter_size": int(cfg["n_inner"]) if cfg.get("n_inner") else None,
            "max_position_embeddings": int(cfg["n_positions"]),
            "vocab_size": int(cfg["vocab_size"]),
            "nonlinearity": _ACTIVATIONS[act],
            "layer_norm_epsilon": float(cfg.get("layer_norm_epsilon", 1e-5)),
            "share_embedding_weights": bool(cfg.get("tie_word_embeddings", True)),
            "attention_type": "scaled_dot_product" if cfg.get("scale_attn_weights", True) else "dot_product",
            "use_bias": True,
            "use_bias_in_output": False,
        }
    except KeyError as e:
        raise ConfigError(f"{WHERE}: {where}: lacks {e.args[0]!r}, a key every GPT2Config has") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{WHERE}: {where}: {e}") from None


def merge_init_from(raw: dict[str, Any], presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``raw`` (a params mapping in our sections) with ``model.init_from``'s keys filled in, and
    ``train_input.tokenizer`` when it is unset; a key given with another value is refused."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("init_from") is None:
        return raw
    path = source_dir(model["init_from"])
    keys = model_keys(path)
    given = {**presets.get(model.get("preset"), {}), **model} if isinstance(model.get("preset"), str) else model
    for key, value in keys.items():
        if key in given and given[key] != value:
            named = "model.preset " + repr(model["preset"]) + " sets " if key not in model else "model."
            raise ConfigError(
                f"{named}{key}: {given[key]!r}, but {path} has {value!r}; drop the key (init_from sets the "
                "model's shape) or give the same value"
            )
    merged = dict(raw)
    merged["model"] = {k: v for k, v in model.items() if k != "preset"} | keys
    train = raw.get("train_input")
    if isinstance(train, dict) or train is None:
        train = dict(train or {})
        if "tokenizer" not in train:
            train["tokenizer"] = _tokenizer(path)
        merged["train_input"] = train
    return merged


def _tokenizer(path: Path) -> str:
    info = exported_info(path)
    if info is not None and info.get("tokenizer") == "byte":
        return "byte"
    if (path / "tokenizer.json").is_file():
        return str(path / "tokenizer.json")
    raise ConfigError(
        f"{WHERE}: {path} holds no tokenizer.json; name the model's tokenizer in train_input.tokenizer "
        "(a tokenizer.json path, or byte for a byte-level vocabulary)"
    )
