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
- ``exclude`` (a regex or a list of regexes, the syntax of ``param_name_patterns``: ``re.search``
  on any of a parameter's names, whatever the form of the selection, ``param_filter`` globs
  included) keeps the parameters it matches dense, even where the heuristic or a pattern selects
  them: e.g. ``exclude: ["^conv1\\.", "^fc\\."]`` keeps a conv net's stem and classifier dense, as
  pruning practice does. A pattern that matches no parameter at all is an error naming
  ``sparsity.exclude``, the pattern and the model's parameter names. It is a top-level key; in
  the zoo's list of groups each item may have its own, which removes parameters from that item's
  selection (a later item may still select them).
- One-dimensional parameters (biases, norm scales) are never sparsified, even when a pattern
  matches them: they are skipped silently, and a pattern that matches only such parameters is an
  error.
- The zoo's 2.2+ spelling ``param_filter`` (a glob or a list of globs, e.g.
  ``"*proj_[qkv]_dense_layer.weight"``) is form 2/3 with shell globs that match the WHOLE name
  (``fnmatch``, case-sensitive) instead of regexes found anywhere in it.
- Unknown keys are errors that name the key and the nearest valid one; nothing is ignored.
- Dynamic sparsity (``algorithm: gmp | set | rigl``): ``sparsity`` may be a schedule, and
  ``update``, ``drop_fraction`` and the 2.0-2.1 ``schedule`` are read, at the top level or per
  group; their meaning is in :mod:`sparsetrain.config.dynamic`. The zoo's 2.x forms are read
  too: a bare number (the level, default heuristic), a list of blocks (each with its own
  algorithm and filter; a parameter takes the first that selects it) and ``{groups: [{params:
  {...}, ...}]}``. ``distribution: erk`` spreads a group's level over its tensors
  (:mod:`sparsetrain.sparsity.erk`); ``init_method: checkerboard`` draws evenly spread masks.

Structure (``structure``, ``block_size``; :mod:`sparsetrain.sparsity.masks` draws the masks):

- ``unstructured`` (the default, the seed's): any entries, ``round(s * numel)`` of them pruned.
- ``block``: the weight (viewed as a matrix ``(shape[0], rest)``) is cut into ``block_size``
  tiles from the top-left corner; exactly ``round(s * number_of_blocks)`` whole blocks are
  pruned. A dimension that is not a multiple of the block size ends in partial edge blocks (no
  error); they count as blocks like any other, so the fraction of ENTRIES pruned can then differ
  slightly from ``s`` (the sparsifier's statistics and ``plan`` report the actual fraction).
  ``block_size`` is an int (square blocks) or ``[rows, cols]`` = ``[outputs, inputs]``: for a
  weight stored inputs first (a Hugging Face ``Conv1D``, in x out) the tile is ``[cols, rows]``
  in storage, the same entries as for the ``nn.Linear`` holding the transposed weight. The
  default 128 is the output tile of the block-sparse GPU kernels
  (``sparsetrain.kernels.block_sparse``, ``nn.Linear`` layers only), the block size they run
  fastest at.
  ``block_size`` is read only by groups whose structure is ``block``: setting it where no group
  uses blocks, or in a group that is not ``block``, is an error.
- ``"N:M"`` (0 < N < M <= 64, e.g. ``"2:4"``): in every run of M consecutive entries along the
  weight's input dimension exactly N are kept, so the sparsity is ``1 - N/M``. The input
  dimension is found from the module holding the weight (:mod:`sparsetrain.sparsity.select`): the
  last for ``nn.Linear`` (out x in) and any other parameter, 0 for a Hugging Face ``Conv1D``
  (in x out), 1 (the input channels, at each output and kernel position: what NVIDIA's ASP does)
  for ``nn.Conv1d/2d/3d``, 0 for transposed convolutions. ``sparsity`` may be
  left out; if it is given at the same level as the structure, or in the group itself, it must
  equal ``1 - N/M`` (to 1e-3; it is stored exactly) or it is an error naming that key. A
  top-level ``sparsity`` inherited by a group that sets its own N:M structure does not apply to
  that group (the N:M ratio does). The input dimension must be a multiple of M (checked when
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
from typing import Any

from sparsetrain.config.dynamic import (
    DYNAMIC_TYPES,
    build_dynamic,
    check_dynamic_keys,
    parse_drop_fraction,
    parse_level,
    split_schedule,
)
from sparsetrain.config.schedules import HyperSchedule, parse_update
from sparsetrain.config.sparsity_settings import GroupSettings, SparsityConfig
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
    parse_distribution,
    parse_exclude,
    parse_fraction,
    parse_init,
    parse_nm,
    parse_seed,
    parse_structure,
    parse_type,
)
from sparsetrain.errors import ConfigError


def parse_sparsity(block: Any, where: str = "sparsity") -> SparsityConfig | None:
    """Validate a ``sparsity:`` block; None or an empty block gives None (dense training).

    Also the zoo's 2.x forms: a plain number (the level, default heuristic), a list of blocks (each
    with its own ``param_filter`` and algorithm; a parameter takes the first that selects it) and
    ``{groups: [...]}`` with ``params:`` sub-mappings. Raises ConfigError, one line naming the key
    at fault and what would be valid.
    """
    if block is None:
        return None
    if isinstance(block, (int, float)) and not isinstance(block, bool):
        return parse_sparsity({"sparsity": block}, where)
    if isinstance(block, Mapping) and "groups" in block:
        block = _flatten_groups(block, where)
    if isinstance(block, (list, tuple)):
        return _parse_list(block, where)
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {kind_of(block)}")
    if not block:
        return None
    source = copy.deepcopy(dict(block))
    kind = parse_type(block, where)  # first: a dynamic algorithm's own keys are not the error
    check_keys(block, TOP_KEYS, where)
    block = split_schedule(block, where)
    check_dynamic_keys(kind, block, where)
    structure = parse_structure(block.get("structure", DEFAULT_STRUCTURE), f"{where}.structure")
    block_size = parse_block_size(block["block_size"], f"{where}.block_size") if "block_size" in block else None
    sparsity = _parse_level(block["sparsity"], kind, structure, where, f"{where}.structure") if "sparsity" in block else None
    init_method = parse_init(block.get("init_method", DEFAULT_INIT_METHOD), f"{where}.init_method")
    seed = parse_seed(block.get("seed", DEFAULT_SEED), f"{where}.seed")
    distribution = parse_distribution(block.get("distribution", "uniform"), f"{where}.distribution")
    top = {
        "sparsity": sparsity, "init_method": init_method, "seed": seed, "structure": structure,
        "block_size": block_size or (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE), "algorithm": kind,
        "update": parse_update(block["update"], f"{where}.update") if "update" in block else None,
        "drop_fraction": parse_drop_fraction(block["drop_fraction"], f"{where}.drop_fraction") if "drop_fraction" in block else None,
        "distribution": distribution,
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
    if distribution == "erk" and any(g.nm is not None for g in groups):
        raise ConfigError(f"{where}.distribution: erk spreads a level over tensors; N:M structure fixes each tensor's level")
    dynamic = None
    if kind in DYNAMIC_TYPES and isinstance(sparsity, HyperSchedule):
        dynamic = build_dynamic(kind, sparsity, top["update"], top["drop_fraction"], f"{where}.sparsity")
    return SparsityConfig(
        kind, sparsity.value(0) if isinstance(sparsity, HyperSchedule) else sparsity, init_method, seed, form, groups,
        structure=structure, block_size=top["block_size"], where=where, source=source,
        dynamic=dynamic, distribution=distribution, exclude=parse_exclude(block.get("exclude"), f"{where}.exclude"),
    )


def _flatten_groups(block: Mapping[str, Any], where: str) -> Any:
    """The zoo's config-class form ``{groups: [{params: {...}, ...}]}``: each item with its
    ``params`` merged in."""
    if len(block) != 1:
        other = next(k for k in block if k != "groups")
        raise ConfigError(f"{where}.{other}: with groups, every setting goes inside a group")
    groups = block["groups"]
    items = groups if isinstance(groups, (list, tuple)) else [groups]
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}.groups[{i}]: expected a mapping of settings, got {kind_of(item)}")
        params = item.get("params", {})
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.groups[{i}].params: expected a mapping of settings, got {kind_of(params)}")
        out.append({**{k: v for k, v in item.items() if k != "params"}, **params})
    return out if isinstance(groups, (list, tuple)) else out[0]


def _parse_list(items: Any, where: str) -> SparsityConfig | None:
    """The zoo's 2.x list of blocks: each its own algorithm, level and filter."""
    parts = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}[{i}]: expected a mapping of settings, got {kind_of(item)}")
        if any(isinstance(v, Mapping) for v in (item.get("param_name_patterns"),)):
            raise ConfigError(f"{where}[{i}].param_name_patterns: in a list of groups, give each group a regex or globs")
        part = parse_sparsity(item, f"{where}[{i}]")
        if part is not None:
            parts.append(part)
    if not parts:
        return None
    if len(parts) == 1:
        return dataclasses.replace(parts[0], where=where, source=copy.deepcopy(list(items)))
    kinds = list(dict.fromkeys(p.type for p in parts))
    first = parts[0]
    return SparsityConfig(
        "+".join(kinds), None, first.init_method, first.seed, "groups",
        tuple(g for p in parts for g in p.groups), structure=first.structure, block_size=first.block_size,
        where=where, source=copy.deepcopy(list(items)), parts=tuple(parts),
    )


def _parse_level(value: Any, kind: str, structure: str, where: str, structure_where: str, key: str = "sparsity") -> Any:
    """A level: a number in [0, 1) for static sparsity, a number or schedule for gmp / set / rigl."""
    here = f"{where}.{key}"
    if kind in DYNAMIC_TYPES:
        if parse_nm(structure) is not None:
            raise ConfigError(
                f"{structure_where}: {structure!r} keeps N of every M fixed; dynamic sparsity ({kind}) changes masks "
                "within unstructured or block structure only"
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parse_fraction(value, here)
        return parse_level(value, kind, here)
    if isinstance(value, (Mapping, list, tuple)):
        raise ConfigError(
            f"{here}: a schedule of the level needs dynamic sparsity; set algorithm: gmp (prune gradually), or "
            f"give a number in [0, 1)"
        )
    return check_nm_sparsity(parse_fraction(value, here), structure, here, structure_where)


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
    overrides = split_schedule(overrides, here)
    check_dynamic_keys(merged["algorithm"], overrides, here)
    root = key.split(".param_name_patterns")[0]
    structure_where = f"{here}.structure" if "structure" in overrides else f"{root}.structure"
    if "sparsity" in overrides:
        merged["sparsity"] = _parse_level(overrides["sparsity"], merged["algorithm"], merged["structure"], here, structure_where)
    elif merged["algorithm"] in DYNAMIC_TYPES and parse_nm(merged["structure"]) is not None:
        raise ConfigError(f"{structure_where}: N:M masks are fixed; dynamic sparsity changes unstructured or block masks")
    if "update" in overrides:
        merged["update"] = parse_update(overrides["update"], f"{here}.update")
    if "drop_fraction" in overrides:
        merged["drop_fraction"] = parse_drop_fraction(overrides["drop_fraction"], f"{here}.drop_fraction")
    if "init_method" in overrides:
        merged["init_method"] = parse_init(overrides["init_method"], f"{here}.init_method")
    if "seed" in overrides:
        merged["seed"] = parse_seed(overrides["seed"], f"{here}.seed")
    return _settings(merged, pattern, here, group=True)


def _settings(values: dict[str, Any], pattern: str | None, where: str, group: bool = False) -> GroupSettings:
    structure = values["structure"]
    nm = parse_nm(structure)
    sparsity = values["sparsity"]
    if nm is not None and values["algorithm"] in DYNAMIC_TYPES:
        raise ConfigError(
            f"{where}.structure: {structure!r} keeps N of every M fixed; dynamic sparsity ({values['algorithm']}) "
            "changes masks within unstructured or block structure only"
        )
    if nm is not None:
        # The N:M ratio decides; a stated value was checked against it where it was set, and a
        # top-level value inherited by a group with its own N:M structure does not apply.
        sparsity = 1.0 - nm[0] / nm[1]
    if sparsity is None:
        root = where.split(".param_name_patterns")[0]
        if group:
            raise ConfigError(f"{where}.sparsity: required; set it in this group or at the top level ({root}.sparsity)")
        raise ConfigError(f"{where}.sparsity: required; a number in [0, 1), the fraction pruned")
    dynamic = None
    if isinstance(sparsity, HyperSchedule):
        dynamic = build_dynamic(values["algorithm"], sparsity, values["update"], values["drop_fraction"], f"{where}.sparsity")
        sparsity = dynamic.initial_sparsity
    block_size = tuple(values["block_size"]) if structure == "block" else None
    return GroupSettings(
        sparsity, values["init_method"], values["seed"], pattern, structure, block_size,
        dynamic=dynamic, distribution=values["distribution"],
    )
