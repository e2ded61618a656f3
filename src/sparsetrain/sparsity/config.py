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

Structure (top level, or per group like every other setting)::

    sparsity:
      sparsity: 0.75
      structure: block             # unstructured (default) | block | "N:M", e.g. "2:4"
      block_size: 128              # block only: an int (square) or [rows, cols]; default 128
      param_name_patterns:
        mlp.*weight: {}                         # 128x128 blocks, 75% of them pruned
        attn.*weight: {structure: "2:4"}        # 2 of every 4 kept; sparsity 0.5 implied

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

Structure (``structure``, ``block_size``; see ``sparsetrain.sparsity.masks`` for the masks):

- ``unstructured`` (the default, the seed's): any entries, ``round(s * numel)`` of them pruned.
- ``block``: the weight (viewed as a matrix ``(shape[0], rest)``) is cut into ``block_size``
  tiles from the top-left corner; exactly ``round(s * number_of_blocks)`` whole blocks are
  pruned. A dimension that is not a multiple of the block size ends in partial edge blocks (no
  error); they count as blocks like any other, so the fraction of ENTRIES pruned can then differ
  slightly from ``s`` (the sparsifier's statistics and ``plan`` report the actual fraction).
  ``block_size`` is an int (square blocks) or ``[rows, cols]``; the default 128 matches the
  128x128 output tiles of Hopper tensor-core kernels (SPEC §7's probe ran 128x128 blocks); it is
  to be confirmed by ``sparsetrain bench`` once the block-sparse GPU kernels exist.
  ``block_size`` is read only by groups whose structure is ``block``: setting it where no group
  uses blocks, or in a group that is not ``block``, is an error.
- ``"N:M"`` (0 < N < M <= 64, e.g. ``"2:4"``): in every run of M consecutive entries along the
  last (input) dimension exactly N are kept, so the sparsity is ``1 - N/M``. ``sparsity`` may be
  left out; if it is given at the same level as the structure, or in the group itself, it must
  equal ``1 - N/M`` (to 1e-3; it is stored exactly) or it is an error naming that key. A
  top-level ``sparsity`` inherited by a group that sets its own N:M structure does not apply to
  that group (the N:M ratio does). The last dimension must be a multiple of M (checked when
  masks are drawn, and by ``plan``). Quote the value in YAML: an unquoted ``2:4`` is YAML 1.1's
  base-60 integer 124; such an integer is read back as ``"2:4"`` (N = v // 60, M = v % 60).
- ``init_method`` applies within the structure: ``topk`` keeps the blocks of largest Frobenius
  norm, or the N largest ``|w|`` of each group of M; ``random`` draws whole blocks, or N of each
  M, from the stable name hash. ``from_zeros`` takes the zeros as found, whatever the structure.
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
TOP_KEYS = (
    "type", "algorithm", "sparsity", "init_method", "seed", "structure", "block_size", "param_name_patterns",
)
GROUP_KEYS = ("sparsity", "init_method", "seed", "structure", "block_size")
# Keys of later versions of the reference (dynamic sparsity): named, not yet built.
FUTURE_KEYS = ("update", "drop_fraction", "schedule")
DEFAULT_INIT_METHOD = "topk"
DEFAULT_SEED = 0
STRUCTURES = ("unstructured", "block")  # and "N:M" strings
DEFAULT_STRUCTURE = "unstructured"
# 128x128: the output tile of Hopper tensor-core kernels (SPEC §7's Triton probe). The issue asks
# for a default chosen by benchmark: to be confirmed with ``sparsetrain bench`` on the GPU kernels.
DEFAULT_BLOCK_SIZE = 128
MAX_NM_M = 64
NM_TOLERANCE = 1e-3  # a stated sparsity within this of 1 - N/M is taken as 1 - N/M
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_LISTED_NAMES = 30
MAX_BLOCK_SIDE = 65536  # larger than any weight dimension we train; keeps index arithmetic in range


def parse_nm(structure: str) -> tuple[int, int] | None:
    """``(N, M)`` of a canonical ``"N:M"`` structure string, None for any other structure."""
    match = _NM_RE.match(structure)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class GroupSettings:
    """Settings of one group of parameters; ``pattern`` None means the default heuristic.

    ``structure`` is ``unstructured``, ``block`` or a canonical ``"N:M"`` string; ``block_size``
    is ``(rows, cols)`` for ``block`` and None otherwise. For ``N:M``, ``sparsity`` is ``1 - N/M``.
    """

    sparsity: float
    init_method: str
    seed: int
    pattern: str | None
    structure: str = DEFAULT_STRUCTURE
    block_size: tuple[int, int] | None = None

    @property
    def group(self) -> str:
        """The group's name in logs and statistics: its pattern, or ``default``."""
        return "default" if self.pattern is None else self.pattern

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M structure, else None."""
        return parse_nm(self.structure)

    @property
    def structure_label(self) -> str:
        """``unstructured``, ``block 16x16`` or ``2:4``: for logs and tables."""
        if self.structure == "block" and self.block_size is not None:
            return f"block {self.block_size[0]}x{self.block_size[1]}"
        return self.structure

    def to_dict(self) -> dict[str, Any]:
        out = {"sparsity": self.sparsity, "init_method": self.init_method, "seed": self.seed, "structure": self.structure}
        if self.block_size is not None:
            out["block_size"] = _block_size_value(self.block_size)
        return out


def _block_size_value(block_size: tuple[int, int]) -> int | list[int]:
    """``block_size`` as written in a params file: an int when square, else ``[rows, cols]``."""
    rows, cols = block_size
    return rows if rows == cols else [rows, cols]


@dataclass(frozen=True)
class SparsityConfig:
    """A validated ``sparsity:`` block.

    ``groups`` holds one ``GroupSettings`` per pattern in file order (form 2: one; form 3: one
    per list item, all with the top-level settings; form 4: one per key), or a single group with
    ``pattern=None`` for the default heuristic. ``sparsity`` is the top-level value, None when
    only the groups set it. ``form`` is ``default``, ``str``, ``list`` or ``dict``.
    ``structure`` and ``block_size`` are the top-level values (defaults filled in) that groups
    inherit; each group's own resolved values are in its ``GroupSettings``.
    """

    type: str
    sparsity: float | None
    init_method: str
    seed: int
    form: str
    groups: tuple[GroupSettings, ...]
    structure: str = DEFAULT_STRUCTURE
    block_size: tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)
    where: str = field(default="sparsity", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict in the same form, with defaults filled in; parses back to an equal config.

        ``structure`` is always written; ``block_size`` only when some group uses blocks.
        """
        out: dict[str, Any] = {"type": self.type}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity
        out["init_method"] = self.init_method
        out["seed"] = self.seed
        out["structure"] = self.structure
        uses_blocks = any(g.block_size is not None for g in self.groups)
        if uses_blocks:
            out["block_size"] = _block_size_value(self.block_size)
        if self.form == "str":
            out["param_name_patterns"] = self.groups[0].pattern
        elif self.form == "list":
            out["param_name_patterns"] = [g.pattern for g in self.groups]
        elif self.form == "dict":
            top = {
                "sparsity": self.sparsity, "init_method": self.init_method, "seed": self.seed,
                "structure": self.structure, "block_size": _block_size_value(self.block_size),
            }
            out["param_name_patterns"] = {
                g.pattern: {k: v for k, v in g.to_dict().items() if top[k] != v} for g in self.groups
            }
        return out

    def describe(self) -> str:
        """One line for the log, e.g. ``sideband, topk, sparsity 0.75, default heuristic``."""
        if self.form == "default":
            g = self.groups[0]
            shape = "" if g.structure == DEFAULT_STRUCTURE else f", {g.structure_label}"
            return f"{self.type}, {g.init_method}, sparsity {g.sparsity:g}{shape}, default heuristic"
        parts = [
            f"{g.pattern!r}: {g.init_method} {g.sparsity:g}" + ("" if g.structure == DEFAULT_STRUCTURE else f" {g.structure_label}")
            for g in self.groups
        ]
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
    structure = _parse_structure(block.get("structure", DEFAULT_STRUCTURE), f"{where}.structure")
    block_size = _parse_block_size(block["block_size"], f"{where}.block_size") if "block_size" in block else None
    sparsity = _parse_fraction(block["sparsity"], f"{where}.sparsity") if "sparsity" in block else None
    if sparsity is not None:
        sparsity = _check_nm_sparsity(sparsity, structure, f"{where}.sparsity", f"{where}.structure")
    init_method = _parse_init(block.get("init_method", DEFAULT_INIT_METHOD), f"{where}.init_method")
    seed = _parse_seed(block.get("seed", DEFAULT_SEED), f"{where}.seed")
    top = {
        "sparsity": sparsity, "init_method": init_method, "seed": seed, "structure": structure,
        "block_size": block_size or (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE),
    }
    form, groups = _parse_patterns(block.get("param_name_patterns"), top, where)
    if block_size is not None and not any(g.structure == "block" for g in groups):
        raise ConfigError(
            f"{where}.block_size: set, but no group has structure: block (it is read only by block "
            f"structure); remove it or set {where}.structure: block"
        )
    return SparsityConfig(
        kind, sparsity, init_method, seed, form, groups,
        structure=structure, block_size=top["block_size"], where=where,
    )


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


def _parse_structure(value: Any, where: str) -> str:
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
        raise ConfigError(f"{where}: expected a string; {valid}; got {_kind(value)}")
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


def _parse_block_size(value: Any, where: str) -> tuple[int, int]:
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


def _check_nm_sparsity(sparsity: float, structure: str, where: str, structure_where: str) -> float:
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
    if "structure" in overrides:
        merged["structure"] = _parse_structure(overrides["structure"], f"{here}.structure")
    if "block_size" in overrides:
        merged["block_size"] = _parse_block_size(overrides["block_size"], f"{here}.block_size")
        if merged["structure"] != "block":
            raise ConfigError(
                f"{here}.block_size: this group's structure is {merged['structure']!r}; block_size is "
                f"read only with structure: block"
            )
    if "sparsity" in overrides:
        root = key.split(".param_name_patterns")[0]
        structure_where = f"{here}.structure" if "structure" in overrides else f"{root}.structure"
        merged["sparsity"] = _check_nm_sparsity(
            _parse_fraction(overrides["sparsity"], f"{here}.sparsity"), merged["structure"], f"{here}.sparsity", structure_where
        )
    if "init_method" in overrides:
        merged["init_method"] = _parse_init(overrides["init_method"], f"{here}.init_method")
    if "seed" in overrides:
        merged["seed"] = _parse_seed(overrides["seed"], f"{here}.seed")
    return _settings(merged, pattern, here, group=True)


def _settings(values: dict[str, Any], pattern: str | None, where: str, group: bool = False) -> GroupSettings:
    structure = values["structure"]
    nm = parse_nm(structure)
    sparsity = values["sparsity"]
    if nm is not None:
        # The N:M ratio decides; a stated value was checked against it where it was set, and a
        # top-level value inherited by a group with its own N:M structure does not apply.
        sparsity = 1.0 - nm[0] / nm[1]
    if sparsity is None:
        root = where.split(".param_name_patterns")[0]
        if group:
            raise ConfigError(f"{where}.sparsity: required; set it in this group or at the top level ({root}.sparsity)")
        raise ConfigError(f"{where}.sparsity: required; a number in [0, 1), the fraction pruned")
    block_size = tuple(values["block_size"]) if structure == "block" else None
    return GroupSettings(sparsity, values["init_method"], values["seed"], pattern, structure, block_size)


def _compile(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:  # huge repeats, deep nesting
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
