"""Which parameters of a model a :class:`~sparsetrain.config.sparsity.SparsityConfig` sparsifies,
with which settings: its patterns (or the default heuristic) resolved against parameter names.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Collection, Iterable, Mapping

import torch
from torch import nn

from sparsetrain.config.sparsity import GroupSettings, SparsityConfig
from sparsetrain.errors import ConfigError
from sparsetrain.kernels.blocks import block_grid
from sparsetrain.sparsity.erk import erk_sparsities
from sparsetrain.sparsity.masks import check_structure, settings_block

log = logging.getLogger(__name__)

MAX_LISTED_NAMES = 30


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
    """Parameter names, layer indices folded (``transformer_decoder.layers.N.ffn.ffn.0.linear_layer.weight``), long lists cut."""
    folded: dict[str, None] = {}
    for names in names_of.values():
        folded[re.sub(r"(?<=layers\.)\d+(?=\.|$)", "N", names[0])] = None
    shown = list(folded)
    if len(shown) > MAX_LISTED_NAMES:
        rest = len(shown) - MAX_LISTED_NAMES
        return ", ".join(shown[:MAX_LISTED_NAMES]) + f", ... ({rest} more)"
    return ", ".join(shown) if shown else "(none)"


def select_for_model(model: nn.Module, config: SparsityConfig) -> dict[str, GroupSettings]:
    """``select_parameters`` on every name of every parameter, embeddings and ties detected; each
    selected weight's shape is checked against its group's structure (N:M needs a last dimension
    that is a multiple of M), so a block that cannot apply fails before any mask is drawn."""
    named = list(model.named_parameters(remove_duplicate=False))
    embedding_params = {
        id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()
    }
    names_of: dict[int, list[str]] = {}
    for name, p in named:
        names_of.setdefault(id(p), []).append(name)
    tied = {
        name
        for key, names in names_of.items()
        if key in embedding_params or (len(names) > 1 and any("embed" in n.lower() for n in names))
        for name in names
    }
    if config.parts:  # the zoo's list of groups: a parameter takes the first group that selects it
        settings: dict[str, GroupSettings] = {}
        for part in config.parts:
            chosen = select_parameters(part, named, tied)
            if chosen and all(name in settings for name in chosen):
                log.warning("%s: every parameter it selects is taken by an earlier group; it selects nothing", part.where)
            for name, group in chosen.items():
                settings.setdefault(name, group)
    else:
        settings = select_parameters(config, named, tied)
    shapes = dict(named)
    for name, group in settings.items():
        check_structure(name, shapes[name].shape, group)
    return spread_erk(settings, {name: tuple(p.shape) for name, p in named})


def spread_erk(settings: dict[str, GroupSettings], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, GroupSettings]:
    """Groups with ``distribution: erk``: each tensor's share of the group's level (the
    Erdos-Renyi kernel, :mod:`sparsetrain.sparsity.erk`); ``level`` keeps the group's. The globs
    or regexes of one list (the zoo's ``param_filter: [...]``) share one spread."""
    pools: dict[GroupSettings, list[str]] = {}
    for name, group in settings.items():
        if group.distribution == "erk" and group.level is None:
            pools.setdefault(erk_pool(group), []).append(name)
    out = dict(settings)
    for names in pools.values():
        group = settings[names[0]]
        shares = erk_shares({n: shapes[n] for n in names}, group.sparsity, group)
        for n in names:
            out[n] = dataclasses.replace(settings[n], sparsity=shares[n], level=settings[n].sparsity)
    return out


def erk_pool(group: GroupSettings) -> GroupSettings:
    """What tensors must share to be spread together: every setting but the pattern and level."""
    return dataclasses.replace(group, pattern=None, glob=None, sparsity=0.0, level=None)


def erk_shares(shapes: Mapping[str, tuple[int, ...]], level: float, group: GroupSettings) -> dict[str, float]:
    """ERK shares of ``level`` over ``shapes``; for block structure over the block grids, so that
    whole blocks add up to the group's exact count (equal-size blocks: its exact entry count)."""
    if group.structure == "block":
        shapes = {n: block_grid(shape, settings_block(group)) for n, shape in shapes.items()}
    return erk_sparsities(shapes, min(level, 1.0 - 1e-12))
