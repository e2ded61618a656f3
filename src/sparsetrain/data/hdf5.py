"""The Cerebras model zoo's HDF5 language-model data (``GptHDF5MapDataProcessor`` /
``GptHDF5DataProcessor``) as a stream: ``.h5`` files with a dataset ``data``, either the corpus
form ``(num_tokens,)`` (cut into windows like any token stream) or the sample form
``(num_samples, 3, msl)`` (input ids, loss mask, labels). Files are opened read-only and read a
batch's rows at a time, never whole. h5py is optional (``pip install h5py``).
"""

from __future__ import annotations

import logging
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sparsetrain.data.stream import MixtureStream, SampleStream, Stream, TokenStream
from sparsetrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MIXTURE_KEYS = ("data_dir", "weight", "data_subset")
_SUBSET_HELP = "give ascending, non-overlapping ranges 'start-end' within [0, 1], e.g. '0.0-0.5,0.7-1.0'"


class HDF5Input(Protocol):
    """The fields of a data section read here (a part of ``sources.DataInput``)."""

    section: str
    data_dir: str | list | None
    mixture: list | None
    data_subset: str | None
    max_sequence_length: int | None


def require_h5py(key: str) -> Any:
    """The h5py module, or a one-line ``DataError`` saying how to install it."""
    try:
        import h5py
    except ImportError:
        raise DataError(f"{key}: HDF5 data needs h5py, which is not installed; pip install h5py") from None
    return h5py


@dataclass(frozen=True)
class DatasetSpec:
    """One ``data_dir`` of a data section (the whole section, or one mixture entry)."""

    key: str  # the params key errors name, e.g. train_input.mixture[1].data_dir
    data_dir: str | list
    weight: float = 1.0
    subset: tuple[tuple[float, float], ...] | None = None


def parse_subset(value: Any, key: str) -> tuple[tuple[float, float], ...]:
    """``'0.0-0.5,0.7-1.0'`` as ((0.0, 0.5), (0.7, 1.0)); a bad string is a one-line ConfigError."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} is not a string; {_SUBSET_HELP}")
    ranges: list[tuple[float, float]] = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*-\s*([0-9.eE+]+)\s*", part)
        try:
            start, end = (float(match.group(1)), float(match.group(2))) if match else (math.nan, math.nan)
        except ValueError:
            start = end = math.nan
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            problem = f"{part.strip()!r} is not a range 'start-end' of numbers in [0, 1]"
        elif start >= end:
            problem = f"{part.strip()!r} does not start before it ends"
        elif ranges and start < ranges[-1][1]:
            problem = f"{part.strip()!r} overlaps or precedes the range before it"
        else:
            ranges.append((start, end))
            continue
        raise ConfigError(f"{key}: {value!r}: {problem}; {_SUBSET_HELP}")
    return tuple(ranges)


def _check_data_dir(value: Any, key: str) -> None:
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(f"{key}: {value!r} is not a directory or .h5 file path, or a non-empty list of them")


def datasets(input: HDF5Input) -> list[DatasetSpec]:
    """The datasets a ``source: hdf5`` section names (``data_dir`` or ``mixture``), keys validated."""
    sec = input.section
    mixture = input.mixture
    subset = input.data_subset
    if mixture is None:
        _check_data_dir(input.data_dir, f"{sec}.data_dir")
        parsed = parse_subset(subset, f"{sec}.data_subset") if subset is not None else None
        return [DatasetSpec(f"{sec}.data_dir", input.data_dir, 1.0, parsed)]
    if subset is not None:
        raise ConfigError(f"{sec}.data_subset: not used with mixture; give data_subset inside each mixture entry")
    if not isinstance(mixture, list) or not mixture:
        raise ConfigError(f"{sec}.mixture: {mixture!r} is not a non-empty list of {{data_dir, weight, data_subset}}")
    out = []
    for i, entry in enumerate(mixture):
        key = f"{sec}.mixture[{i}]"
        if not isinstance(entry, dict) or "data_dir" not in entry or "weight" not in entry:
            raise ConfigError(f"{key}: {entry!r} is not a mapping with data_dir and weight (data_subset optional)")
        unknown = sorted(set(entry) - set(MIXTURE_KEYS))
        if unknown:
            raise ConfigError(f"{key}: unknown key {unknown[0]!r}; valid keys: {', '.join(MIXTURE_KEYS)}")
        _check_data_dir(entry["data_dir"], f"{key}.data_dir")
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ConfigError(f"{key}.weight: {weight!r} is not a number >= 0")
        sub = entry.get("data_subset")
        parsed = parse_subset(sub, f"{key}.data_subset") if sub is not None else None
        out.append(DatasetSpec(f"{key}.data_dir", entry["data_dir"], float(weight), parsed))
    if sum(d.weight for d in out) <= 0:
        raise ConfigError(f"{sec}.mixture: the weights sum to 0; give at least one a positive weight")
    return out


def _natural(name: str) -> list:
    """Sort key of a file name: digit runs compare as numbers (data_2.h5 before data_10.h5)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def h5_files(data_dir: str | list, key: str) -> list[Path]:
    """The .h5 files of a data_dir: each directory's ``*.h5`` by name, or the named files."""
    files: list[Path] = []
    for entry in data_dir if isinstance(data_dir, list) else [data_dir]:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(
                (p for p in path.glob("*.h5") if not p.name.startswith(".") and p.is_file()),
                key=lambda p: _natural(p.name),
            )
            if not found:
                raise DataError(f"{key}: directory {entry!r} holds no .h5 files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"{key}: {entry!r} is not a regular file or a directory")
        else:
            raise DataError(f"{key}: {entry!r} does not exist (give a directory of .h5 files or an .h5 file)")
    return files


def open_data(path: Path, key: str, h5py: Any) -> tuple[Any, int]:
    """The ``data`` dataset of an .h5 file (read-only) and its number of rows to use."""
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{key}: {path} is not a readable HDF5 file ({exc})") from exc
    data = handle.get("data")
    if not isinstance(data, h5py.Dataset):
        found = ", ".join(sorted(handle.keys())[:10]) or "nothing"
        raise DataError(
            f"{key}: {path} has no dataset 'data' (it holds {found}); the zoo's .h5 files keep tokens there"
        )
    if not (data.ndim == 1 or (data.ndim == 3 and data.shape[1] == 3)):
        raise DataError(
            f"{key}: {path}: dataset 'data' has shape {data.shape}; expected (num_tokens,) (corpus form) "
            "or (num_samples, 3, max_sequence_length) (sample form)"
        )
    if data.dtype.kind not in "iu":
        raise DataError(f"{key}: {path}: dataset 'data' holds {data.dtype}, not integer token ids")
    rows = data.shape[0]
    if data.ndim == 3 and "n_examples" in handle.attrs:  # the 1.x GptHDF5DataProcessor's files
        value = handle.attrs["n_examples"]
        try:
            n = operator.index(value.item() if isinstance(value, np.ndarray) and value.size == 1 else value)
        except TypeError:
            n = -1
        if not 0 <= n <= rows:
            raise DataError(
                f"{key}: {path}: attribute n_examples {value} is not an integer in [0, {rows}] (rows of 'data')"
            )
        rows = n
    return data, rows


def _index_ranges(subset: tuple[tuple[float, float], ...] | None, total: int) -> list[tuple[int, int]]:
    """Fraction ranges as index ranges of ``total`` items: ``[floor(a n), floor(b n))``."""
    cut = lambda f: min(total, math.floor(f * total + 1e-9))
    return [(0, total)] if subset is None else [(cut(a), cut(b)) for a, b in subset if cut(b) > cut(a)]


def _pieces(ranges: list[tuple[int, int]], counts: list[int]) -> list[tuple[int, int, int]]:
    """Global index ranges over items numbered across files as (file, first, end) pieces."""
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    out = []
    for lo, hi in ranges:
        for k in range(len(counts)):
            first, end = max(lo, starts[k]), min(hi, starts[k + 1])
            if first < end:
                out.append((k, first - starts[k], end - starts[k]))
    return out


class TokenSlice:
    """Tokens ``[start, stop)`` of a 1-D (h5py) array, sliced lazily: a data_subset of a corpus file."""

    ndim = 1

    def __init__(self, array: Any, start: int, stop: int):
        self.array, self.start, self.stop = array, start, stop
        self.dtype = array.dtype

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi, _ = key.indices(len(self))
        return np.asarray(self.array[self.start + lo : self.start + max(lo, hi)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[:].astype(dtype) if dtype is not None else self[:]


def _stream(ds: DatasetSpec, input: HDF5Input, h5py: Any, seen: dict[str, Any]) -> TokenStream | SampleStream:
    """One dataset's stream; ``seen`` (form and sample length of the first file) spans a mixture."""
    sec, msl = input.section, input.max_sequence_length
    files = h5_files(ds.data_dir, ds.key)
    opened = [open_data(path, ds.key, h5py) for path in files]
    for path, (data, _) in zip(files, opened):
        form = "corpus" if data.ndim == 1 else "sample"
        first = seen.setdefault("first", (path, form, data.shape[-1]))
        if form != first[1]:
            raise DataError(
                f"{ds.key}: {path} holds {form}-form data {data.shape} but {first[0]} {first[1]}-form "
                "data; all files of one data section must have one form"
            )
        if form == "sample" and data.shape[2] != first[2]:
            raise DataError(
                f"{ds.key}: the samples of {path} have length {data.shape[2]}, those of {first[0]} "
                f"{first[2]}; all files of one data section must agree"
            )
    path, form, length = seen["first"]
    if form == "corpus" and msl is None:
        raise ConfigError(
            f"{sec}.max_sequence_length: required for corpus-form HDF5 data ({path} holds a 1-D token "
            "array); the sample form (N, 3, msl) carries its own"
        )
    if form == "sample" and msl is not None and msl != length:
        raise DataError(
            f"{sec}.max_sequence_length: {msl} differs from the length {length} of the samples in "
            f"{path}; set it to {length} or null (taken from the data)"
        )
    counts = [rows if form == "sample" else max(0, (rows - 1) // msl) for _, rows in opened]
    ranges = _index_ranges(ds.subset, sum(counts))
    pieces = _pieces(ranges, counts)
    if ds.subset is not None and not pieces:
        what = "samples" if form == "sample" else f"sequences of {msl + 1} tokens"
        subset_key = ds.key.rsplit(".", 1)[0] + ".data_subset"
        raise DataError(f"{subset_key}: selects none of the {sum(counts)} {what} of {ds.data_dir!r}")
    names = [str(p) for p in files]
    if form == "sample":
        log.info(
            "%s: %d file(s), %d samples of %d tokens", ds.key, len(files), sum(h - lo for _, lo, h in pieces), length
        )
        return SampleStream([data for data, _ in opened], names, pieces)
    if ds.subset is None:
        return TokenStream([data for data, _ in opened], names)
    slices = [TokenSlice(opened[k][0], lo * msl, hi * msl + 1) for k, lo, hi in pieces]
    return TokenStream(slices, [f"{names[k]}[{lo * msl}:{hi * msl + 1}]" for k, lo, hi in pieces])


def hdf5_stream(input: HDF5Input) -> Stream:
    """The stream of a ``source: hdf5`` data section (see the module docstring).

    ``data_dir``: one dataset, a :class:`TokenStream` (corpus form) or a :class:`SampleStream`;
    ``mixture``: a :class:`MixtureStream` of one per entry, drawn by weight. ``data_subset`` keeps
    the fraction ranges of a dataset's samples (or windows of ``max_sequence_length + 1``
    tokens), numbered over its files in order. Files are opened read-only; nothing is read whole.
    """
    specs = datasets(input)
    h5py = require_h5py(specs[0].key)
    seen: dict[str, Any] = {}
    streams = [_stream(ds, input, h5py, seen) for ds in specs]
    if input.mixture is None:
        return streams[0]
    return MixtureStream(streams, [ds.weight for ds in specs], [ds.key for ds in specs])
