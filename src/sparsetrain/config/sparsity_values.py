"""The values of single keys of the ``sparsity:`` block: their names, defaults and parsers.

Each parser takes the value as YAML gave it and the key's path for messages, and returns the
canonical value or raises a one-line :class:`~sparsetrain.errors.ConfigError` that names the key
and what would be valid. :mod:`sparsetrain.config.sparsity` assembles them into a config.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from sparsetrain.config.fields import number
from sparsetrain.errors import ConfigError

TYPES = ("sideband", "static", "gmp", "set", "rigl")
TYPE_ALIASES = {"static": "sideband"}
INIT_METHODS = ("topk", "random", "from_zeros", "checkerboard")
DISTRIBUTIONS = ("uniform", "erk")
TOP_KEYS = (
    "type", "algorithm", "sparsity", "init_method", "seed", "structure", "block_size", "param_name_patterns",
    "param_filter", "update", "drop_fraction", "schedule", "distribution", "exclude",
)
GROUP_KEYS = ("sparsity", "init_method", "seed", "structure", "block_size", "update", "drop_fraction", "schedule")
# Keys of the reference's RigL that are named here but not built (balanced per-group competition).
FUTURE_KEYS = ("balance_in_groups", "balance_out_groups")
DEFAULT_INIT_METHOD = "topk"
DEFAULT_SEED = 0
STRUCTURES = ("unstructured", "block")  # and "N:M" strings
DEFAULT_STRUCTURE = "unstructured"
# The output tile of the block-sparse GPU kernels: the block size they run fastest at.
DEFAULT_BLOCK_SIZE = 128
MAX_NM_M = 64
NM_TOLERANCE = 1e-3  # a stated sparsity within this of 1 - N/M is taken as 1 - N/M
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_BLOCK_SIDE = 65536  # larger than any weight dimension we train; keeps index arithmetic in range


def parse_nm(structure: str) -> tuple[int, int] | None:
    """``(N, M)`` of a canonical ``"N:M"`` structure string, None for any other structure."""
    match = _NM_RE.match(structure)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_type(block: Mapping[str, Any], where: str) -> str:
    if "type" in block and "algorithm" in block:
        raise ConfigError(f"{where}.algorithm: is an alias of {where}.type; give only one of them")
    key = "algorithm" if "algorithm" in block else "type"
    value = block.get(key, "sideband")
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key}: expected a string, one of {', '.join(TYPES)}; got {kind_of(value)}")
    kind = value.strip().lower()
    if kind not in TYPES:
        raise ConfigError(f"{where}.{key}: {value!r} is not valid; choose one of {', '.join(TYPES)}")
    return TYPE_ALIASES.get(kind, kind)


FRACTION_MEANING = "the fraction of weights pruned in each selected tensor (e.g. 0.75 prunes 75%)"


def parse_fraction(value: Any, where: str) -> float:
    """A sparsity level in [0, 1). Out of range, the message says what the number means and guesses
    no other value: 1.5 may be a 1.5% or a 15% meant, and a wrong guess taken trains another model."""
    value = number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: expected a number in [0, 1), got {kind_of(value)}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}: {value:g} is not valid; expected a number in [0, 1), {FRACTION_MEANING}")
    return value


def parse_init(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in INIT_METHODS:
        raise ConfigError(f"{where}: {value!r} is not valid; choose one of {', '.join(INIT_METHODS)}")
    return value.strip().lower()


def parse_structure(value: Any, where: str) -> str:
    """``unstructured``, ``block`` or a canonical ``"N:M"`` (0 < N < M <= 64)."""
    valid = f"choose unstructured, block, or an N:M string such as \"2:4\" (0 < N < M <= {MAX_NM_M})"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 2 * 60 + 4 = 124.
        n, m = divmod(int(value), 60)
        if 0 < n < m:
            return f"{n}:{m}"
        read_as = f" (YAML read an unquoted {n}:{m} as the number {value})" if n > 0 else ""
        raise ConfigError(f"{where}: {value!r} is not valid{read_as}; {valid}; quote N:M values in YAML")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string; {valid}; got {kind_of(value)}")
    lower = value.strip().lower()
    if lower in STRUCTURES:
        return lower
    nm = parse_nm(lower)
    if nm is None:
        raise ConfigError(f"{where}: {value!r} is not valid; {valid}")
    n, m = nm
    if not 0 < n < m <= MAX_NM_M:
        raise ConfigError(f"{where}: {value!r} is not valid; N:M needs 0 < N < M <= {MAX_NM_M} (N kept of every M)")
    return f"{n}:{m}"


def parse_block_size(value: Any, where: str) -> tuple[int, int]:
    """A positive int (square blocks) or ``[rows, cols]``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if 1 <= value <= MAX_BLOCK_SIDE:
            return (int(value), int(value))
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= MAX_BLOCK_SIDE for v in value):
            return (int(value[0]), int(value[1]))
    raise ConfigError(
        f"{where}: {value!r} is not valid; expected a positive integer (square blocks) or [rows, cols], "
        f"each at most {MAX_BLOCK_SIDE}"
    )


def check_nm_sparsity(sparsity: float, structure: str, where: str, structure_where: str) -> float:
    """For N:M, a stated sparsity must be ``1 - N/M``; returns the exact value."""
    nm = parse_nm(structure)
    if nm is None:
        return sparsity
    n, m = nm
    implied = 1.0 - n / m
    if abs(sparsity - implied) > NM_TOLERANCE:
        raise ConfigError(
            f"{where}: {sparsity:g} does not match {structure_where} {structure!r}, which keeps {n} of "
            f"every {m} entries (sparsity {implied:g}); set {implied:g} or leave sparsity out"
        )
    return implied


def parse_distribution(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {value!r} is not valid; choose one of {', '.join(DISTRIBUTIONS)}")
    return value.strip().lower()


def parse_seed(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where}: expected an integer, got {kind_of(value)}")
    return int(value)


def compile_pattern(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:  # huge repeats, deep nesting
        raise ConfigError(f"{where}: {pattern!r} is not a valid regex: {exc}") from None


def parse_exclude(value: Any, where: str) -> tuple[str, ...]:
    """``exclude``: a regex or a list of regexes (``re.search``, as ``param_name_patterns``)."""
    if value is None:
        return ()
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise ConfigError(f"{where}: expected a regex or a non-empty list of regexes, got {kind_of(value)}")
    for i, pattern in enumerate(patterns):
        here = where if isinstance(value, str) else f"{where}[{i}]"
        if not isinstance(pattern, str):
            raise ConfigError(f"{here}: expected a regex string, got {kind_of(pattern)}")
        compile_pattern(pattern, here)
    return tuple(patterns)


def check_keys(
    block: Mapping[str, Any],
    valid: tuple[str, ...],
    where: str,
    top_level_keys: tuple[str, ...] = (),
) -> None:
    for key in block:
        if key in valid:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a string; valid keys: {', '.join(valid)}")
        if key in FUTURE_KEYS:
            raise ConfigError(
                f"{where}.{key}: RigL's balanced per-group competition is not built; remove it (masks then "
                f"compete over each whole tensor); valid keys: {', '.join(valid)}"
            )
        if key in top_level_keys:
            raise ConfigError(
                f"{where}.{key}: cannot be set per group, only at the top level; valid group keys: {', '.join(valid)}"
            )
        close = _closest(key, valid)
        hint = f"did you mean {close!r}? " if close else ""
        raise ConfigError(f"{where}.{key}: unknown key; {hint}valid keys: {', '.join(valid)}")


def _closest(key: str, valid: tuple[str, ...]) -> str | None:
    """The valid key nearest to ``key``: same spelling in other case, a prefix, or difflib's."""
    lower = key.lower().replace("-", "_")
    for candidate in valid:
        if candidate == lower or (len(lower) >= 3 and candidate.startswith(lower)):
            return candidate
    close = difflib.get_close_matches(lower, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def kind_of(value: Any) -> str:
    if isinstance(value, (str, bool, int, float)) or value is None:
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__
