"""Relative data paths of a params file: the working directory first, then beside the params file.

A shipped config names its data relative to itself (``data/tiny_completions.jsonl``), and has to
work from any directory, ``--params builtin:NAME`` outside a checkout included. The rule, in this
one place: a relative ``data_path`` (file, directory or glob), ``data_dir`` (or each entry of a
list, or of a mixture) that does not exist relative to the working directory, but does beside the
params file, is replaced by that path (so ``model_dir/params.yaml`` records a path that works from
anywhere). A path that exists relative to the working directory, an absolute one, and one found
in neither place are left as written (a missing ``data_path``'s error says where it was looked
for). The params file's directory comes in the section's ``params_dir`` (set when a params file
is loaded; absent or None for params built in code, which keep the working directory alone).
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def params_dir(input: Any) -> Path | None:
    """The directory of the params file the section was read from, if it was read from one."""
    value = getattr(input, "params_dir", None)
    return Path(value) if value else None


def _found(path: Path) -> bool:
    text = str(path)
    if any(c in text for c in "*?["):
        return any(True for _ in glob.iglob(text, recursive=True))
    return path.exists()


def beside(value: str, base: Path | None) -> str:
    """``value`` itself, unless it is relative, missing from the working directory and found
    under ``base``: then ``base / value``. Pure but for the file system lookups."""
    path = Path(value).expanduser()
    if base is None or path.is_absolute() or _found(path):
        return value
    other = base / path
    return str(other) if _found(other) else value


def locate_paths(input: Any) -> None:
    """Apply :func:`beside` to the section's ``data_path``, ``data_dir`` and mixture ``data_dir``
    values, in place (idempotent: a path once found stays found), logging each one moved."""
    base = params_dir(input)
    if base is None:
        return

    def moved(key: str, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value
        new = beside(value, base)
        if new != value:
            log.info("%s: %r is not in the working directory; using %s, beside the params file", key, value, new)
        return new

    def each(key: str, value: Any) -> Any:
        return [moved(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else moved(key, value)

    sec = input.section
    if getattr(input, "data_path", None) is not None:
        input.data_path = moved(f"{sec}.data_path", input.data_path)
    if getattr(input, "data_dir", None) is not None:
        input.data_dir = each(f"{sec}.data_dir", input.data_dir)
    mixture = getattr(input, "mixture", None)
    if isinstance(mixture, list):
        input.mixture = [
            {**entry, "data_dir": each(f"{sec}.mixture[{i}].data_dir", entry["data_dir"])}
            if isinstance(entry, dict) and "data_dir" in entry else entry
            for i, entry in enumerate(mixture)
        ]


def where_looked(value: str, input: Any) -> str:
    """`` in the working directory nor beside the params file (DIR)`` for a relative path the rule
    looked up in both places, else ''."""
    base = params_dir(input)
    if base is None or Path(value).expanduser().is_absolute():
        return ""
    return f" in the working directory nor beside the params file ({base})"
