"""The ``sparsity:`` block of a params file, parsed once into a typed :class:`SparsityConfig`.

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
        ffn.*weight: {}                         # 128x128 blocks, 75% of them pruned
        self_attn.*weight: {structure: "2:4"}        # 2 of every 4 kept; sparsity 0.5 implied

Rules:

- ``sparsity`` is the fraction of entries pruned in EACH selected tensor, a number in [0, 1).
  It is required at the top level or in every group. ``from_zeros`` ignores it (the mask is the
  set of entries already zero), but it is still required, as the documented target.
- Patterns are Python regexes matched with ``re.search`` against the fully qualified parameter
  name (any of its names, when a parameter is shared). In form 4 a parameter takes the FIRST
  pattern in file order that matches it; its settings are the top-level ones updated by the
  group's. A parameter that matches nothing stays dense; a pattern that matches no parameter at
  all is an error that lists the model's parameter names. Patterns are resolved against a model
  by :mod:`sparsetrain.sparsity.select`; parsing needs no model.
- Default heuristic (no patterns): every parameter with more than one dimension whose lower-cased
  name contains neither ``norm`` nor ``embed`` and that is not the LM head (``lm_head`` in the
  name, or a weight that is, or is tied to, an embedding table).
- One-dimensional parameters (biases, norm scales) are never sparsified, even when a pattern
  matches them: they are skipped silently, and a pattern that matches only such parameters is an
  error.
- The zoo's 2.2+ spelling ``param_filter`` (a glob or a list of globs, e.g.
  ``"*proj_[qkv]_dense_layer.weight"``) is form 2/3 with shell globs that match the WHOLE name
  (``fnmatch``, case-sensitive) instead of regexes found anywhere in it.
- Unknown keys are errors that name the key and the nearest valid one; nothing is ignored.

Structure (``structure``, ``block_size``; :mod:`sparsetrain.sparsity.masks` draws the masks):

- ``unstructured`` (the default, the seed's): any entries, ``round(s * numel)`` of them pruned.
- ``block``: the weight (viewed as a matrix ``(shape[0], rest)``) is cut into ``block_size``
  tiles from the top-left corner; exactly ``round(s * number_of_blocks)`` whole blocks are
  pruned. A dimension that is not a multiple of the block size ends in partial edge blocks (no
  error); they count as blocks like any other, so the fraction of ENTRIES pruned can then differ
  slightly from ``s`` (the sparsifier's statistics and ``plan`` report the actual fraction).
  ``block_size`` is an int (square blocks) or ``[rows, cols]``; the default 128 is the output
  tile of the block-sparse GPU kernels (``sparsetrain.kernels.block_sparse``), the block size
  they run fastest at.
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

import copy
import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sparsetrain.config.sparsity_values import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_INIT_METHOD,
    DEFAULT_SEED,
    DEFAULT_STRUCTURE,
    GROUP_KEYS,
    TOP_KEYS,
    check_keys,
    check_nm_sparsity,
    compile_pattern,
    kind_of,
    parse_block_size,
    parse_fraction,
    parse_init,
    parse_nm,
    parse_seed,
    parse_structure,
    parse_type,
)
from sparsetrain.errors import ConfigError


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
    glob: str | None = None  # a 2.2+ ``param_filter`` glob, of which ``pattern`` is the regex

    @property
    def group(self) -> str:
        """The group's name in logs and statistics: its pattern (or glob), or ``default``."""
        if self.glob is not None:
            return self.glob
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
    only the groups set it. ``form`` is ``default``, ``str``, ``list``, ``dict`` or, for the 2.2+
    ``param_filter`` globs, ``filter`` (one glob) / ``filter_list``.
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
    source: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def to_params(self) -> dict[str, Any]:
        """The block as the params file wrote it (what ``model_dir/params.yaml`` and checkpoints
        record), or :meth:`to_dict` for a config built without one."""
        return copy.deepcopy(dict(self.source)) if self.source is not None else self.to_dict()

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
        if self.form == "filter":
            out["param_filter"] = self.groups[0].glob
        elif self.form == "filter_list":
            out["param_filter"] = [g.glob for g in self.groups]
        elif self.form == "str":
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
            f"{g.group!r}: {g.init_method} {g.sparsity:g}" + ("" if g.structure == DEFAULT_STRUCTURE else f" {g.structure_label}")
            for g in self.groups
        ]
        return f"{self.type}, " + "; ".join(parts)

    def group_where(self, index: int) -> str:
        """The key path of group ``index`` for error messages."""
        g = self.groups[index]
        if self.form == "filter":
            return f"{self.where}.param_filter ({g.glob!r})"
        if self.form == "filter_list":
            return f"{self.where}.param_filter[{index}] ({g.glob!r})"
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
        raise ConfigError(f"{where}: expected a mapping of settings, got {kind_of(block)}")
    if not block:
        return None
    kind = parse_type(block, where)  # first: a dynamic algorithm's own keys are not the error
    check_keys(block, TOP_KEYS, where)
    structure = parse_structure(block.get("structure", DEFAULT_STRUCTURE), f"{where}.structure")
    block_size = parse_block_size(block["block_size"], f"{where}.block_size") if "block_size" in block else None
    sparsity = parse_fraction(block["sparsity"], f"{where}.sparsity") if "sparsity" in block else None
    if sparsity is not None:
        sparsity = check_nm_sparsity(sparsity, structure, f"{where}.sparsity", f"{where}.structure")
    init_method = parse_init(block.get("init_method", DEFAULT_INIT_METHOD), f"{where}.init_method")
    seed = parse_seed(block.get("seed", DEFAULT_SEED), f"{where}.seed")
    top = {
        "sparsity": sparsity, "init_method": init_method, "seed": seed, "structure": structure,
        "block_size": block_size or (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE),
    }
    if "param_filter" in block:
        if "param_name_patterns" in block:
            raise ConfigError(f"{where}.param_filter: give param_filter (globs) or param_name_patterns (regexes), not both")
        form, groups = _parse_filter(block["param_filter"], top, where)
    else:
        form, groups = _parse_patterns(block.get("param_name_patterns"), top, where)
    if block_size is not None and not any(g.structure == "block" for g in groups):
        raise ConfigError(
            f"{where}.block_size: set, but no group has structure: block (it is read only by block "
            f"structure); remove it or set {where}.structure: block"
        )
    return SparsityConfig(
        kind, sparsity, init_method, seed, form, groups,
        structure=structure, block_size=top["block_size"], where=where, source=copy.deepcopy(dict(block)),
    )


def _parse_patterns(value: Any, top: dict[str, Any], where: str) -> tuple[str, tuple[GroupSettings, ...]]:
    key = f"{where}.param_name_patterns"
    if value is None:
        return "default", (_settings(top, None, where),)
    if isinstance(value, str):
        compile_pattern(value, key)
        return "str", (_settings(top, value, where),)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{key}: empty list; give at least one regex or remove the key")
        for i, pattern in enumerate(value):
            if not isinstance(pattern, str):
                raise ConfigError(f"{key}[{i}]: expected a regex string, got {kind_of(pattern)}")
            compile_pattern(pattern, f"{key}[{i}]")
        return "list", tuple(_settings(top, p, where) for p in value)
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(f"{key}: empty mapping; give at least one regex or remove the key")
        return "dict", tuple(_group(pattern, over, top, key) for pattern, over in value.items())
    raise ConfigError(
        f"{key}: expected a regex string, a list of regexes, or a mapping of regex to settings; got {kind_of(value)}"
    )


def _parse_filter(value: Any, top: dict[str, Any], where: str) -> tuple[str, tuple[GroupSettings, ...]]:
    """2.2+ ``param_filter``: a glob or a list of globs, each matching the WHOLE parameter name
    (``fnmatch`` rules, case-sensitive: ``*`` any text, ``?`` one character, ``[qkv]`` a set)."""
    key = f"{where}.param_filter"
    globs = [value] if isinstance(value, str) else value
    if not isinstance(globs, (list, tuple)) or not globs:
        raise ConfigError(f"{key}: expected a glob or a non-empty list of globs, got {kind_of(value)}")
    groups = []
    for i, glob in enumerate(globs):
        if not isinstance(glob, str):
            raise ConfigError(f"{key}[{i}]: expected a glob string, got {kind_of(glob)}")
        regex = r"\A" + fnmatch.translate(glob)
        groups.append(dataclasses.replace(_settings(top, regex, where), glob=glob))
    return ("filter" if isinstance(value, str) else "filter_list"), tuple(groups)


def _group(pattern: Any, overrides: Any, top: dict[str, Any], key: str) -> GroupSettings:
    if not isinstance(pattern, str):
        raise ConfigError(f"{key}: pattern {pattern!r} is not a string; quote it in the YAML file")
    here = f'{key}["{pattern}"]'
    compile_pattern(pattern, here)
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{here}: expected a mapping of settings ({', '.join(GROUP_KEYS)}), got {kind_of(overrides)}")
    check_keys(overrides, GROUP_KEYS, here, top_level_keys=TOP_KEYS)
    merged = dict(top)
    if "structure" in overrides:
        merged["structure"] = parse_structure(overrides["structure"], f"{here}.structure")
    if "block_size" in overrides:
        merged["block_size"] = parse_block_size(overrides["block_size"], f"{here}.block_size")
        if merged["structure"] != "block":
            raise ConfigError(
                f"{here}.block_size: this group's structure is {merged['structure']!r}; block_size is "
                f"read only with structure: block"
            )
    if "sparsity" in overrides:
        root = key.split(".param_name_patterns")[0]
        structure_where = f"{here}.structure" if "structure" in overrides else f"{root}.structure"
        merged["sparsity"] = check_nm_sparsity(
            parse_fraction(overrides["sparsity"], f"{here}.sparsity"), merged["structure"], f"{here}.sparsity", structure_where
        )
    if "init_method" in overrides:
        merged["init_method"] = parse_init(overrides["init_method"], f"{here}.init_method")
    if "seed" in overrides:
        merged["seed"] = parse_seed(overrides["seed"], f"{here}.seed")
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
