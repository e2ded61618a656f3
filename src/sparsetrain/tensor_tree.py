"""Apply a function to every tensor of a nested state: checkpoint dicts, optimizer state dicts.

``map_tensors(fn, tree)`` rebuilds dicts (any mapping becomes a plain dict), lists, tuples and
namedtuples around ``fn(tensor)``; everything else is returned as it is. The input is not changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {key: map_tensors(fn, value) for key, value in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple takes its fields positionally
        return type(tree)(*(map_tensors(fn, value) for value in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(fn, value) for value in tree)
    return tree
