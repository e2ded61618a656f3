"""Which parameters of a model a :class:`~sparsetrain.config.sparsity.SparsityConfig` sparsifies,
with which settings: its patterns (or the default heuristic) resolved against parameter names,
less those its ``exclude`` patterns keep dense, each with its input dimension where that is not
the last (:func:`input_dim`). ``sparsify`` and ``plan`` both select through here.
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
        chosen = _select_default(config, names_of, tensors, set(tied_to_embedding))
    else:
        chosen = _select_patterns(config, names_of, tensors)
    return _exclude(config, chosen, names_of, tensors)


def _exclude(config: SparsityConfig, chosen: dict[str, GroupSettings], names_of, tensors) -> dict[str, GroupSettings]:
    """``chosen`` less the parameters an ``exclude`` regex matches (by any of their names); a
    regex that matches no parameter of the model is an error that shows a few weight names."""
    if not config.exclude:
        return chosen
    dense: set[str] = set()
    for i, pattern in enumerate(config.exclude):
        regex = re.compile(pattern)
        hits = [names[0] for names in names_of.values() if any(regex.search(n) for n in names)]
        if not hits:
            raise ConfigError(
                f"{config.exclude_where(i)}: matches no parameter (a regex, re.search on the full name); "
                f"the model's weights include: {_few_weights(names_of, tensors)}"
            )
        dense.update(hits)
    return {name: group for name, group in chosen.items() if name not in dense}


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


def input_dim(module: nn.Module, tensor: torch.Tensor) -> int | None:
    """The input dimension of ``module``'s weight ``tensor`` where it is not the last, else None.

    ``nn.Linear`` (out x in) and any module not listed: the last. A Hugging Face ``Conv1D``
    (``transformers.pytorch_utils.Conv1D``, in x out; recognised by name and its ``nf`` attribute,
    without importing transformers): 0. ``nn.Conv1d/2d/3d`` (out, in / groups, *kernel): 1, the
    input channels, grouped at each output and kernel position as NVIDIA's ASP does (the
    reduction dimension of the implicit GEMM, innermost in channels-last layout). Transposed
    convolutions (in, out / groups, *kernel): 0.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 0
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    if type(module).__name__ == "Conv1D" and tensor.ndim == 2 and getattr(module, "nf", None) == tensor.shape[1]:
        return 0
    return None


def _input_dims(model: nn.Module) -> dict[int, int]:
    """id(weight) -> its input dimension, for the weights whose input dimension is not the last."""
    dims: dict[int, int] = {}
    for module in model.modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if isinstance(weight, torch.Tensor) and weight.ndim > 1:
            dim = input_dim(module, weight)
            if dim is not None:
                dims.setdefault(id(weight), dim)
    return dims


def _few_weights(names_of: Mapping[int, list[str]], tensors: Mapping[int, torch.Tensor], limit: int = 8) -> str:
    """The names of a few weights (more than one dimension), layer indices folded (``h.N.mlp``)."""
    folded = {
        re.sub(r"(?<=\.)\d+(?=\.)", "N", names[0]): None for key, names in names_of.items() if tensors[key].ndim > 1
    }
    shown = list(folded) or [names[0] for names in names_of.values()]
    rest = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + rest if shown else "(none)"


def select_for_model(model: nn.Module, config: SparsityConfig) -> dict[str, GroupSettings]:
    """``select_parameters`` on every name of every parameter, embeddings and ties detected, each
    selected weight's input dimension recorded (``GroupSettings.input_dim``) where it is not the
    last; each selected weight's shape is checked against its group's structure (N:M needs an
    input dimension that is a multiple of M), so a block that cannot apply fails before any mask
    is drawn."""
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
    dims = _input_dims(model)
    for name, group in settings.items():
        dim = dims.get(id(shapes[name]))
        if dim is not None:
            settings[name] = group = dataclasses.replace(group, input_dim=dim)
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
        shares = erk_shares({n: shapes[n] for n in names}, settings[names[0]].sparsity, settings)
        for n in names:
            out[n] = dataclasses.replace(settings[n], sparsity=shares[n], level=settings[n].sparsity)
    return out


def erk_pool(group: GroupSettings) -> GroupSettings:
    """What tensors must share to be spread together: every setting but the pattern, level and
    the tensor's own layout."""
    return dataclasses.replace(group, pattern=None, glob=None, sparsity=0.0, level=None, input_dim=None)


def erk_shares(
    shapes: Mapping[str, tuple[int, ...]], level: float, settings: Mapping[str, GroupSettings]
) -> dict[str, float]:
    """ERK shares of ``level`` over ``shapes`` (``settings``: each tensor's); for block structure
    over the block grids (each in its tensor's layout), so that whole blocks add up to the
    group's exact count (equal-size blocks: its exact entry count)."""
    if settings[next(iter(shapes))].structure == "block":
        shapes = {n: block_grid(shape, settings_block(settings[n])) for n, shape in shapes.items()}
    return erk_sparsities(shapes, min(level, 1.0 - 1e-12))
