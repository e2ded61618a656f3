"""What a ``sparsity:`` block would do to a model, before any mask is drawn: which parameters it
sparsifies, with which settings and counts, as a table to print or a list of entries to inspect.

    report = sparsetrain.plan(model, {"sparsity": 0.75, "exclude": ["lm_head"]})   # any nn.Module
    print(report)                       # one row per sparsified tensor, the totals, the dense ones
    report["transformer.h.0.mlp.c_fc.weight"].kept   # or: for entry in report: ...

The selection is :func:`~sparsetrain.sparsity.select.select_for_model`, the one ``sparsify``
runs, and the counts are :func:`~sparsetrain.sparsity.masks.expected_pruned`'s, so a plan says
what ``sparsify`` will do, errors included (a pattern that matches nothing, an N:M structure on
a dimension that is not a multiple of M). Counts are exact, except for ``topk`` blocks with
partial edge blocks (an estimate, marked ``~``). Only shapes are read: a model on the meta
device plans as well. ``sparsetrain plan`` builds its rows here and prints them with
:func:`plan_table`, whose column widths come from the contents.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from sparsetrain.config.sparsity import GroupSettings, SparsityConfig, parse_sparsity
from sparsetrain.config.sparsity_values import DEFAULT_BLOCK_SIZE
from sparsetrain.kernels.blocks import block_grid, kernel_block_ok
from sparsetrain.sparsity.masks import expected_pruned, nm_dim, num_pruned_blocks, settings_block
from sparsetrain.sparsity.select import select_for_model


@dataclass(frozen=True)
class PlanEntry:
    """One sparsified parameter: its settings and what its mask will prune.

    ``input_dim``: the weight's input dimension (non-negative), along which N:M groups run.
    ``exact`` is False only for ``topk`` blocks with partial edge blocks, whose pruned count
    depends on which blocks the weights pick (then an estimate). Block entries also carry the
    group's ``block_size`` ([outputs, inputs]), the number of ``blocks`` (edge blocks included),
    ``pruned_blocks`` and ``gpu_kernels`` (an ``nn.Linear`` weight the block-sparse GPU kernels
    can run, :func:`~sparsetrain.sparsity.block_linear.use_block_kernels`).
    """

    name: str
    shape: tuple[int, ...]
    group: str
    sparsity: float
    init_method: str
    structure: str
    pruned: int
    kept: int
    input_dim: int
    exact: bool = True
    block_size: tuple[int, int] | None = None
    blocks: int | None = None
    pruned_blocks: int | None = None
    gpu_kernels: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """The row of ``sparsetrain plan --json`` (see :mod:`sparsetrain.tools`)."""
        row: dict[str, Any] = {
            "name": self.name, "shape": list(self.shape), "numel": self.numel, "group": self.group,
            "sparsity": self.sparsity, "init_method": self.init_method, "pruned": self.pruned, "kept": self.kept,
            "structure": self.structure,
        }
        if self.structure not in ("unstructured", "block"):
            row["input_dim"] = self.input_dim
        if self.structure == "block":
            row.update({
                "block_size": list(self.block_size), "blocks": self.blocks, "pruned_blocks": self.pruned_blocks,
                "pruned_exact": self.exact, "gpu_kernels": self.gpu_kernels,
            })
        return row


@dataclass(frozen=True)
class Plan:
    """The sparsified parameters (``entries``, in model order) and the names left ``dense``.

    Iterating gives the entries; ``plan[name]`` one of them; ``str(plan)`` the table.
    """

    entries: tuple[PlanEntry, ...]
    dense: tuple[str, ...]
    dense_numel: int = 0

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> PlanEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"{name!r} is not sparsified by this plan (sparsified: {', '.join(self.names) or 'none'})")

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def __str__(self) -> str:
        rows = [entry.to_dict() for entry in self.entries]
        lines = [*plan_table(rows), totals_line(rows)] if rows else ["no parameter is sparsified: the model trains dense"]
        if any(r.get("gpu_kernels") for r in rows):
            lines.append("* the block-sparse GPU kernels can run it (sparsetrain.use_block_kernels; CUDA, bf16 autocast)")
        if any(r.get("pruned_exact") is False for r in rows):
            lines.append("~ topk blocks with partial edge blocks: the count depends on which blocks are kept (estimate)")
        lines.append(f"left dense ({len(self.dense)}): {', '.join(self.dense)}")
        return "\n".join(lines)


def plan(model: nn.Module, block: Mapping[str, Any] | SparsityConfig | None) -> Plan:
    """What ``sparsify(model, block)`` would sparsify, and how (see the module docstring).

    ``block`` is the ``sparsity:`` mapping (as a params file writes it, e.g. ``{"sparsity": 0.75,
    "structure": "2:4", "exclude": ["lm_head"]}``), a parsed config, or None (dense). Bad input
    raises the one-line ``ConfigError`` that ``sparsify`` would.
    """
    config = block if isinstance(block, SparsityConfig) or block is None else parse_sparsity(block)
    return plan_for(model, select_for_model(model, config) if config is not None else {})


def plan_for(model: nn.Module, settings: Mapping[str, GroupSettings]) -> Plan:
    """The plan of a selection already made (``select_for_model``'s result)."""
    linear_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    entries, dense, dense_numel = [], [], 0
    for name, p in model.named_parameters():
        group = settings.get(name)
        if group is None:
            dense.append(name)
            dense_numel += p.numel()
            continue
        entries.append(_entry(name, tuple(p.shape), group, name in linear_weights))
    return Plan(tuple(entries), tuple(dense), dense_numel)


def _entry(name: str, shape: tuple[int, ...], group: GroupSettings, linear: bool) -> PlanEntry:
    pruned, exact = expected_pruned(name, shape, group)
    numel = math.prod(shape)
    common = dict(
        name=name, shape=shape, group=group.group, sparsity=group.sparsity, init_method=group.init_method,
        structure=group.structure, pruned=pruned, kept=numel - pruned, input_dim=nm_dim(group) % max(len(shape), 1),
        exact=exact,
    )
    if group.structure != "block":
        return PlanEntry(**common)
    stored = settings_block(group)
    rows, cols = block_grid(shape, stored)
    return PlanEntry(
        **common, block_size=tuple(group.block_size or (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)), blocks=rows * cols,
        pruned_blocks=num_pruned_blocks(shape, group.sparsity, stored), gpu_kernels=linear and kernel_block_ok(shape, stored),
    )


# -- the table -------------------------------------------------------------------------------------

_COLUMNS = ("parameter", "shape", "group", "sparsity", "init", "structure", "kept")
_RIGHT = {"sparsity", "kept"}


def _cells(row: Mapping[str, Any]) -> tuple[str, ...]:
    structure = row.get("structure", "unstructured")
    if structure == "block":
        structure = "block {}x{}{}".format(*row["block_size"], "*" if row.get("gpu_kernels") else "")
    elif "input_dim" in row and row["input_dim"] != len(row["shape"]) - 1:
        structure = f"{structure} dim {row['input_dim']}"  # N:M along another dimension than the last
    approx = "~" if row.get("pruned_exact") is False else ""
    return (
        row["name"], "x".join(map(str, row["shape"])), str(row["group"]), f"{row['sparsity']:.3f}",
        row["init_method"], structure, f"{approx}{row['kept']:,}",
    )


def plan_table(rows: list[Mapping[str, Any]]) -> list[str]:
    """The header and one line per row (``PlanEntry.to_dict`` rows), each column as wide as its
    widest cell, so long parameter names never push the columns out of line."""
    cells = [_COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return [
        "  ".join(
            cell.rjust(width) if column in _RIGHT else cell.ljust(width)
            for cell, width, column in zip(line, widths, _COLUMNS, strict=True)
        ).rstrip()
        for line in cells
    ]


def totals_line(rows: list[Mapping[str, Any]]) -> str:
    total = sum(r["numel"] for r in rows)
    pruned = sum(r["pruned"] for r in rows)
    return f"{len(rows)} sparsified tensors: {pruned:,} of {total:,} entries pruned ({pruned / max(total, 1):.1%})"
