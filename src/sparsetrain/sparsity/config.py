"""The ``sparsity:`` block of a params file: parse, validate, and resolve it against a model.

All four forms of the reference model zoo are accepted::

    sparsity:                      # 1. default heuristic
      type: sideband               #    (alias: static)
      sparsity: 0.3
      init_method: random          #    topk (default) | random | from_zeros
      seed: 1234                   #    default 0; only `random` uses it

    sparsity:                      # 2. one regex
      sparsity: 0.3
      param_name_patterns: "fc_layers.*weight"

    sparsity:                      # 3. any of several regexes
      sparsity: 0.3
      param_name_patterns: ["fc_layers.*weight", "final_layer.*weight"]

    sparsity:                      # 4. per-group settings
      param_name_patterns:
        fc_layers.*weight: {sparsity: 0.3}
        final_layer.*weight: {sparsity: 0.4, init_method: random}

Rules:

- ``sparsity`` is the fraction of entries pruned in EACH selected tensor, a number in [0, 1).
  It is required at the top level or in every group. ``from_zeros`` ignores it (the mask is the
  set of entries already zero), but it is still required, as the documented target.
- Patterns are Python regexes matched with ``re.search`` against the fully qualified parameter
  name (any of its names, when a parameter is shared). In form 4 a parameter takes the FIRST
  pattern in file order that matches it; its settings are the top-level ones updated by the
  group's. A parameter that matches nothing stays dense; a pattern that matches no parameter at
  all is an error that lists the model's parameter names.
- Default heuristic (no patterns): every parameter with more than one dimension whose lower-cased
  name contains neither ``norm`` nor ``embed`` and that is not the LM head (``lm_head`` in the
  name, or a weight that is, or is tied to, an embedding table).
- One-dimensional parameters (biases, norm scales) are never sparsified, even when a pattern
  matches them: they are skipped silently, and a pattern that matches only such parameters is an
  error.
- Unknown keys are errors that name the key and the nearest valid one; nothing is ignored.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsetrain.errors import ConfigError

log = logging.getLogger(__name__)

TYPES = ("sideband", "static")
TYPE_ALIASES = {"static": "sideband"}
NOT_YET_TYPES = ("gmp", "set", "rigl")
INIT_METHODS = ("topk", "random", "from_zeros")
TOP_KEYS = ("type", "algorithm", "sparsity", "init_method", "seed", "param_name_patterns")
GROUP_KEYS = ("sparsity", "init_method", "seed")
# Keys of later versions of the reference (structured and dynamic sparsity): named, not yet built.
FUTURE_KEYS = ("structure", "update", "drop_fraction", "schedule")
DEFAULT_INIT_METHOD = "topk"
DEFAULT_SEED = 0
MAX_LISTED_NAMES = 30


@dataclass(frozen=True)
class GroupSettings:
    """Settings of one group of parameters; ``pattern`` None means the default heuristic."""

    sparsity: float
    init_method: str
    seed: int
    pattern: str | None

    @property
    def group(self) -> str:
        """The group's name in logs and statistics: its pattern, or ``default``."""
        return "default" if self.pattern is None else self.pattern

    def to_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "init_method": self.init_method, "seed": self.seed}


@dataclass(frozen=True)
class SparsityConfig:
    """A validated ``sparsity:`` block.

    ``groups`` holds one ``GroupSettings`` per pattern in file order (form 2: one; form 3: one
    per list item, all with the top-level settings; form 4: one per key), or a single group with
    ``pattern=None`` for the default heuristic. ``sparsity`` is the top-level value, None when
    only the groups set it. ``form`` is ``default``, ``str``, ``list`` or ``dict``.
    """

    type: str
    sparsity: float | None
    init_method: str
    seed: int
    form: str
    groups: tuple[GroupSettings, ...]
    where: str = field(default="sparsity", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict in the same form, with defaults filled in; parses back to an equal config."""
        out: dict[str, Any] = {"type": self.type}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity
        out["init_method"] = self.init_method
        out["seed"] = self.seed
        if self.form == "str":
            out["param_name_patterns"] = self.groups[0].pattern
        elif self.form == "list":
            out["param_name_patterns"] = [g.pattern for g in self.groups]
        elif self.form == "dict":
            top = {"sparsity": self.sparsity, "init_method": self.init_method, "seed": self.seed}
            out["param_name_patterns"] = {
                g.pattern: {k: v for k, v in g.to_dict().items() if top[k] != v} for g in self.groups
            }
        return out

    def describe(self) -> str:
        """One line for the log, e.g. ``sideband, topk, sparsity 0.75, default heuristic``."""
        if self.form == "default":
            g = self.groups[0]
            return f"{self.type}, {g.init_method}, sparsity {g.sparsity:g}, default heuristic"
        parts = [f"{g.pattern!r}: {g.init_method} {g.sparsity:g}" for g in self.groups]
        return f"{self.type}, " + "; ".join(parts)

    def group_where(self, index: int) -> str:
        """The key path of group ``index`` for error messages."""
        g = self.groups[index]
        if self.form == "str":
            return f"{self.where}.param_name_patterns ({g.pattern!r})"
        if self.form == "list":
            return f"{self.where}.param_name_patterns[{index}] ({g.pattern!r})"
        if self.form == "dict":
            return f'{self.where}.param_name_patterns["{g.pattern}"]'
        return f"{self.where} (default heuristic)"


def parse_sparsity(block: Mapping[str, Any] | None, where: str = "sparsity") -> SparsityConfig | None:
    """Validate a ``sparsity:`` block; None or an empty block gives None (dense training).

    Raises ConfigError, one line naming the key at fault and what would be valid.
    """
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {_kind(block)}")
    if not block:
        return None
    _check_keys(block, TOP_KEYS, where)
    kind = _parse_type(block, where)
    sparsity = _parse_fraction(block["sparsity"], f"{where}.sparsity") if "sparsity" in block else None
    init_method = _parse_init(block.get("init_method", DEFAULT_INIT_METHOD), f"{where}.init_method")
    seed = _parse_seed(block.get("seed", DEFAULT_SEED), f"{where}.seed")
    top = {"sparsity": sparsity, "init_method": init_method, "seed": seed}
    form, groups = _parse_patterns(block.get("param_name_patterns"), top, where)
    return SparsityConfig(kind, sparsity, init_method, seed, form, groups, where)


def select_parameters(
    config: SparsityConfig,
    named_params: Iterable[tuple[str, torch.Tensor]],
    tied_to_embedding: Collection[str] = frozenset(),
) -> dict[str, GroupSettings]:
    """Which parameters get which settings, in the order of ``named_params``.

    ``named_params`` may list a shared parameter under several names (as
    ``named_parameters(remove_duplicate=False)`` does): the first name is the key, and patterns
    match any of its names. ``tied_to_embedding`` names parameters that are, or are tied to, an
    embedding table; the default heuristic leaves them dense.
    """
    names_of: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in named_params:
        names_of.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    if config.form == "default":
        return _select_default(config, names_of, tensors, set(tied_to_embedding))
    return _select_patterns(config, names_of, tensors)


def _select_default(config, names_of, tensors, tied) -> dict[str, GroupSettings]:
    settings = config.groups[0]
    chosen = {
        names[0]: settings
        for key, names in names_of.items()
        if tensors[key].ndim > 1 and not any(_is_embedding_or_head(n, tied) for n in names)
    }
    if not chosen:
        raise ConfigError(
            f"{config.where}: the default heuristic selects no parameter (it takes tensors of "
            f"more than one dimension that are not norms, embeddings or the LM head); set "
            f"param_name_patterns to one of: {_list_names(names_of)}"
        )
    return chosen


def _is_embedding_or_head(name: str, tied: set[str]) -> bool:
    lower = name.lower()
    return "norm" in lower or "embed" in lower or "lm_head" in lower or name in tied


def _select_patterns(config, names_of, tensors) -> dict[str, GroupSettings]:
    compiled = [re.compile(g.pattern) for g in config.groups]
    matched = [0] * len(compiled)  # parameters each pattern matches at all
    taken = [0] * len(compiled)  # parameters it selects (first match, more than one dimension)
    chosen: dict[str, GroupSettings] = {}
    for key, names in names_of.items():
        first = None
        for i, regex in enumerate(compiled):
            if any(regex.search(n) for n in names):
                matched[i] += 1
                first = i if first is None else first
        if first is not None and tensors[key].ndim > 1:
            taken[first] += 1
            chosen[names[0]] = config.groups[first]
    for i in range(len(compiled)):
        if matched[i] == 0:
            raise ConfigError(
                f"{config.group_where(i)}: matches no parameter; the model's parameters are: {_list_names(names_of)}"
            )
        if taken[i] == 0:
            _unused_pattern(config, i, names_of, tensors, compiled)
    return chosen


def _unused_pattern(config, i, names_of, tensors, compiled) -> None:
    """A pattern that matches parameters but selects none: error if 1-D only, else shadowed."""
    regex = compiled[i]
    hits = [key for key, names in names_of.items() if any(regex.search(n) for n in names)]
    if all(tensors[key].ndim <= 1 for key in hits):
        raise ConfigError(
            f"{config.group_where(i)}: matches only one-dimensional parameters (biases, norms), "
            f"which are never sparsified; the model's parameters are: {_list_names(names_of)}"
        )
    log.warning(
        "%s: every parameter it matches is taken by an earlier pattern; it selects nothing",
        config.group_where(i),
    )


def _list_names(names_of: Mapping[int, list[str]]) -> str:
    """Parameter names, layer indices folded (``layers.N.mlp.fc.weight``), long lists cut."""
    folded: dict[str, None] = {}
    for names in names_of.values():
        folded[re.sub(r"(?<=\.)\d+(?=\.|$)", "N", names[0])] = None
    shown = list(folded)
    if len(shown) > MAX_LISTED_NAMES:
        rest = len(shown) - MAX_LISTED_NAMES
        return ", ".join(shown[:MAX_LISTED_NAMES]) + f", ... ({rest} more)"
    return ", ".join(shown) if shown else "(none)"


def _parse_type(block: Mapping[str, Any], where: str) -> str:
    if "type" in block and "algorithm" in block:
        raise ConfigError(f"{where}.algorithm: is an alias of {where}.type; give only one of them")
    key = "algorithm" if "algorithm" in block else "type"
    value = block.get(key, "sideband")
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key}: expected a string, one of {', '.join(TYPES)}; got {_kind(value)}")
    kind = value.strip().lower()
    if kind in NOT_YET_TYPES:
        raise ConfigError(f"{where}.{key}: {value!r} is not supported yet, only sideband/static")
    if kind not in TYPES:
        raise ConfigError(f"{where}.{key}: {value!r} is not valid; choose one of {', '.join(TYPES)}")
    return TYPE_ALIASES.get(kind, kind)


def _parse_fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: expected a number in [0, 1), got {_kind(value)}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        hint = f" (did you mean {value / 100:g}?)" if 1.0 < value <= 100.0 else ""
        raise ConfigError(
            f"{where}: {value:g} is not valid; expected a number in [0, 1), the fraction of "
            f"entries pruned in each selected tensor{hint}"
        )
    return value


def _parse_init(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in INIT_METHODS:
        raise ConfigError(f"{where}: {value!r} is not valid; choose one of {', '.join(INIT_METHODS)}")
    return value.strip().lower()


def _parse_seed(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where}: expected an integer, got {_kind(value)}")
    return int(value)


def _parse_patterns(value: Any, top: dict[str, Any], where: str) -> tuple[str, tuple[GroupSettings, ...]]:
    key = f"{where}.param_name_patterns"
    if value is None:
        return "default", (_settings(top, None, where),)
    if isinstance(value, str):
        _compile(value, key)
        return "str", (_settings(top, value, where),)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{key}: empty list; give at least one regex or remove the key")
        for i, pattern in enumerate(value):
            if not isinstance(pattern, str):
                raise ConfigError(f"{key}[{i}]: expected a regex string, got {_kind(pattern)}")
            _compile(pattern, f"{key}[{i}]")
        return "list", tuple(_settings(top, p, where) for p in value)
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(f"{key}: empty mapping; give at least one regex or remove the key")
        return "dict", tuple(_group(pattern, over, top, key) for pattern, over in value.items())
    raise ConfigError(
        f"{key}: expected a regex string, a list of regexes, or a mapping of regex to settings; got {_kind(value)}"
    )


def _group(pattern: Any, overrides: Any, top: dict[str, Any], key: str) -> GroupSettings:
    if not isinstance(pattern, str):
        raise ConfigError(f"{key}: pattern {pattern!r} is not a string; quote it in the YAML file")
    here = f'{key}["{pattern}"]'
    _compile(pattern, here)
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{here}: expected a mapping of settings ({', '.join(GROUP_KEYS)}), got {_kind(overrides)}")
    _check_keys(overrides, GROUP_KEYS, here, top_level_keys=TOP_KEYS)
    merged = dict(top)
    if "sparsity" in overrides:
        merged["sparsity"] = _parse_fraction(overrides["sparsity"], f"{here}.sparsity")
    if "init_method" in overrides:
        merged["init_method"] = _parse_init(overrides["init_method"], f"{here}.init_method")
    if "seed" in overrides:
        merged["seed"] = _parse_seed(overrides["seed"], f"{here}.seed")
    return _settings(merged, pattern, here, group=True)


def _settings(values: dict[str, Any], pattern: str | None, where: str, group: bool = False) -> GroupSettings:
    if values["sparsity"] is None:
        root = where.split(".param_name_patterns")[0]
        if group:
            raise ConfigError(f"{where}.sparsity: required; set it in this group or at the top level ({root}.sparsity)")
        raise ConfigError(f"{where}.sparsity: required; a number in [0, 1), the fraction pruned")
    return GroupSettings(values["sparsity"], values["init_method"], values["seed"], pattern)


def _compile(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where}: {pattern!r} is not a valid regex: {exc}") from None


def _check_keys(
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
            raise ConfigError(f"{where}.{key}: not supported yet; valid keys: {', '.join(valid)}")
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


def _kind(value: Any) -> str:
    if isinstance(value, (str, bool, int, float)) or value is None:
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__
