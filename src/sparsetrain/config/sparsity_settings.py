"""The parsed ``sparsity:`` block: :class:`GroupSettings` (one group's settings) and
:class:`SparsityConfig` (the whole block). Parsing and the block's rules are in
:mod:`sparsetrain.config.sparsity`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from sparsetrain.config.dynamic import DynamicSettings
from sparsetrain.config.sparsity_values import DEFAULT_BLOCK_SIZE, DEFAULT_STRUCTURE, parse_nm


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
    dynamic: DynamicSettings | None = None  # gmp / set / rigl: how the masks change; None: fixed
    distribution: str = "uniform"  # "erk": the group's level spread over its tensors (Erdos-Renyi kernel)
    level: float | None = None  # with erk: the group's level (``sparsity`` is then this tensor's share)
    # Per parameter, set by selection (never parsed): the weight's input dimension where it is not
    # the last (a Hugging Face Conv1D's in x out weight: 0; a convolution's input channels: 1).
    # N:M groups run along it; ``block_size`` reads as [outputs, inputs] (swapped when it is 0).
    input_dim: int | None = None

    @property
    def algorithm(self) -> str:
        """``static`` or the dynamic algorithm (gmp, set, rigl)."""
        return "static" if self.dynamic is None else self.dynamic.algorithm

    @property
    def target(self) -> float:
        """The group's stated level: ``level`` under erk, else ``sparsity``."""
        return self.sparsity if self.level is None else self.level

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
        out = {"sparsity": self.target, "init_method": self.init_method, "seed": self.seed, "structure": self.structure}
        if self.dynamic is not None:
            out.update(self.dynamic.to_dict())
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
    inherit; each group's own resolved values are in its ``GroupSettings``. ``exclude`` holds the
    regexes of parameters kept dense whatever selects them (in the zoo's list of groups, each
    part has its own).
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
    source: Any = field(default=None, compare=False, repr=False)
    dynamic: DynamicSettings | None = None  # the top level's, that groups inherit
    distribution: str = "uniform"
    parts: tuple[SparsityConfig, ...] = ()  # the zoo's list of groups: one config per item
    exclude: tuple[str, ...] = ()  # regexes (re.search) of parameters kept dense even if selected

    @property
    def is_dynamic(self) -> bool:
        """Whether any group's masks change during training."""
        return any(g.dynamic is not None for g in self.groups)

    def to_params(self) -> Any:
        """The block as the params file wrote it (what ``model_dir/params.yaml`` and checkpoints
        record), or :meth:`to_dict` for a config built without one."""
        return copy.deepcopy(self.source) if self.source is not None else self.to_dict()

    def to_dict(self) -> Any:
        """A plain dict in the same form, with defaults filled in; parses back to an equal config
        (the zoo's list of groups: a list of such dicts).

        ``structure`` is always written; ``block_size`` only when some group uses blocks.
        """
        if self.parts:
            return [part.to_dict() for part in self.parts]
        out: dict[str, Any] = {"type": self.type}
        if self.dynamic is not None:
            out.update(self.dynamic.to_dict())
        elif self.sparsity is not None:
            out["sparsity"] = self.sparsity
        if self.distribution != "uniform":
            out["distribution"] = self.distribution
        out["init_method"] = self.init_method
        out["seed"] = self.seed
        out["structure"] = self.structure
        uses_blocks = any(g.block_size is not None for g in self.groups)
        if uses_blocks:
            out["block_size"] = _block_size_value(self.block_size)
        if self.exclude:
            out["exclude"] = list(self.exclude)
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
                **(self.dynamic.to_dict() if self.dynamic is not None else {}),
            }
            out["param_name_patterns"] = {
                g.pattern: {k: v for k, v in g.to_dict().items() if top.get(k) != v} for g in self.groups
            }
        return out

    def describe(self) -> str:
        """One line for the log, e.g. ``sideband, topk, sparsity 0.75, default heuristic``."""
        text = self._describe()
        return text + "; exclude " + ", ".join(repr(p) for p in self.exclude) if self.exclude else text

    def _describe(self) -> str:
        if self.parts:
            return " | ".join(part.describe() for part in self.parts)
        if self.dynamic is not None and all(g.dynamic == self.dynamic for g in self.groups):
            where = "default heuristic" if self.form == "default" else ", ".join(repr(g.group) for g in self.groups)
            g = self.groups[0]
            shape = "" if g.structure == DEFAULT_STRUCTURE else f", {g.structure_label}"
            return f"{self.dynamic.describe()}, init {g.init_method}{shape}: {where}"
        if self.form == "default":
            g = self.groups[0]
            shape = "" if g.structure == DEFAULT_STRUCTURE else f", {g.structure_label}"
            return f"{self.type}, {g.init_method}, sparsity {g.sparsity:g}{shape}, default heuristic"
        parts = [
            f"{g.group!r}: {g.init_method} {g.sparsity:g}" + ("" if g.structure == DEFAULT_STRUCTURE else f" {g.structure_label}")
            for g in self.groups
        ]
        return f"{self.type}, " + "; ".join(parts)

    def exclude_where(self, index: int) -> str:
        """The key path of ``exclude`` pattern ``index`` for error messages."""
        raw = self.source.get("exclude") if isinstance(self.source, dict) else None
        at = "" if isinstance(raw, str) else f"[{index}]"
        return f"{self.where}.exclude{at} ({self.exclude[index]!r})"

    def group_where(self, index: int) -> str:
        """The key path of group ``index`` for error messages."""
        if self.parts:
            for part in self.parts:
                if index < len(part.groups):
                    return part.group_where(index)
                index -= len(part.groups)
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
