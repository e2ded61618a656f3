"""How a params section is declared and validated: one dataclass field per key, with its
documentation, valid choices and range in ``metadata`` (:func:`setting`), and
:func:`build_section`, which checks a section's mapping key by key and raises a one-line
:class:`~sparsetrain.errors.ConfigError` naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any

from sparsetrain.errors import ConfigError


def setting(default: Any, doc: str, **meta: Any) -> Any:
    """A dataclass field with documentation and validation metadata (choices, min, max)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


def key_text(key: Any) -> str:
    """A key as written in an error message: plain if it is a simple name, else its repr (one line)."""
    text = str(key)
    if isinstance(key, str) and text.isprintable() and text.strip() == text and text and len(text) <= 80:
        return text
    return repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."


def number(value: Any) -> Any:
    """A number YAML 1.1 left as a string (``1e-3``, ``75e-2``: an exponent without a dot) as the
    float it means; anything else as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def closest(name: str, valid: typing.Iterable[str], what: str = "keys") -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid {what}: {', '.join(sorted(valid))}"


def type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; accept ints for floats and '1e-3' strings."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: a value is required ({type_name(tp)})")
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
        if arg is dict and isinstance(value, dict):
            return value
    if float in args and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; users mean the number.
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")


def check_range(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
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
            raise ConfigError(f"{section}.{key_text(key)}: unknown key{closest(str(key), fields)}")
        choices = fields[key].metadata.get("choices")
        if choices is not None and isinstance(value, bool) and not isinstance(choices[0], bool):
            # YAML 1.1 reads on/off/yes/no as booleans: name the valid words instead.
            raise ConfigError(
                f"{section}.{key}: {value!r} is not valid; choose one of {', '.join(map(str, choices))} "
                "(YAML reads unquoted on/off/yes/no as true/false: quote the word)"
            )
        values[key] = coerce(value, hints[key], f"{section}.{key}")
        check_range(values[key], fields[key].metadata, f"{section}.{key}")
    return cls(**values)
