"""Corpora: the files of a text source, their stable train/eval split, and their documents.

Sources are ``stdlib`` (the running interpreter's standard library), ``text`` (a file, directory
or glob) and ``jsonl`` (one document per line, or with ``prompt_field`` one prompt/completion
record per line: :mod:`sparsetrain.data.completions`); ``shards`` and ``hdf5`` hold tokens, not
text, and only their keys are checked here. The train/eval split is a stable hash of each file's
relative path (blake2b), so it never depends on the machine, the process or the order files are
listed in; a single file is split inside itself (a jsonl file by the hash of each record's
position). Relative paths follow :mod:`sparsetrain.data.paths` (working directory, then beside the
params file).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from sparsetrain.data import hdf5
from sparsetrain.data.paths import locate_paths, where_looked
from sparsetrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

SOURCES = ("stdlib", "text", "jsonl", "shards", "hdf5")
HDF5_KEYS = ("data_dir", "mixture", "data_subset")  # only for source hdf5
SPLITS = ("train", "eval", "all")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class DataInput(Protocol):
    """The fields of a data section that this package reads (``config.sections.InputParams``)."""

    source: str
    data_path: str | None
    data_dir: str | list | None
    mixture: list | None
    data_subset: str | None
    shuffle_seed: int | None
    text_field: str
    prompt_field: str | None
    completion_field: str
    tokenizer: str
    bpe_vocab_size: int
    split: str | None
    eval_fraction: float
    batch_size: int
    max_sequence_length: int | None
    shuffle: bool
    section: str


def split_of(input: DataInput) -> str:
    """The section's split; unset (None) means ``eval`` for eval_input, else ``train``."""
    return input.split or ("eval" if input.section == "eval_input" else "train")


def check_input(input: DataInput) -> None:
    """Raise ``ConfigError`` for a data section whose values cannot work, naming the key.

    Every reader of a section calls it first, so it is also where relative paths are looked up
    beside the params file (:func:`~sparsetrain.data.paths.locate_paths`, in place, idempotent).
    """
    sec = input.section
    if input.source not in SOURCES:
        raise ConfigError(f"{sec}.source: {input.source!r} is not one of {', '.join(SOURCES)}")
    locate_paths(input)
    _check_prompt_keys(input)
    if input.split is not None and input.split not in SPLITS:
        raise ConfigError(f"{sec}.split: {input.split!r} is not one of {', '.join(SPLITS)}")
    if not 0.0 <= input.eval_fraction <= 1.0:
        raise ConfigError(f"{sec}.eval_fraction: {input.eval_fraction} is not in [0, 1]")
    if input.source == "hdf5":
        _check_hdf5(input)
        return
    for name in HDF5_KEYS:
        if getattr(input, name) is not None:
            raise ConfigError(f"{sec}.{name}: only for source hdf5 (source is {input.source!r}); remove it")
    if input.max_sequence_length is None:
        raise ConfigError(
            f"{sec}.max_sequence_length: null only for source hdf5 (its samples carry a length); give a number"
        )
    if input.source != "stdlib" and not input.data_path:
        raise ConfigError(
            f"{sec}.data_path: required for source {input.source!r} "
            f"({'a shard directory' if input.source == 'shards' else 'a file, directory or glob'})"
        )


def _check_prompt_keys(input: DataInput) -> None:
    """``prompt_field`` only for jsonl, and naming another field than ``completion_field``."""
    prompt = getattr(input, "prompt_field", None)
    if prompt is None:
        return
    sec = input.section
    if input.source != "jsonl":
        raise ConfigError(f"{sec}.prompt_field: only for source jsonl (source is {input.source!r}); remove it")
    if not prompt or not input.completion_field:
        raise ConfigError(f"{sec}.{'prompt_field' if not prompt else 'completion_field'}: empty; name a field of the records")
    if prompt == input.completion_field:
        raise ConfigError(
            f"{sec}.prompt_field: {prompt!r} is also completion_field; name two fields (the prompt and the completion)"
        )


def _check_hdf5(input: DataInput) -> None:
    """``source: hdf5`` needs exactly one of data_dir and mixture (split and eval_fraction do not apply)."""
    sec = input.section
    has_dir, has_mix = input.data_dir is not None, input.mixture is not None
    if has_dir == has_mix:
        raise ConfigError(
            f"{sec}.data_dir: source hdf5 needs data_dir (a directory of .h5 files, an .h5 file or a list) "
            f"or mixture, exactly one of them ({'both' if has_dir else 'neither'} given)"
        )
    if input.data_path:
        raise ConfigError(f"{sec}.data_path: not used with source hdf5; give data_dir instead")
    hdf5.datasets(input)  # the keys' values; the files are read later


def _hash_unit(key: str) -> float:
    """Stable value in [0, 1) for ``key``: blake2b, never Python's salted ``hash``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2.0**53  # 53 bits: exact in a float, < 1


def _eval_mask(keys: Sequence[str], eval_fraction: float) -> list[bool]:
    """Which keys form the eval split: hash < eval_fraction.

    With two or more keys and ``0 < eval_fraction < 1`` neither split is left empty: if no key falls
    under the fraction, the one with the lowest hash goes to eval (and if all do, the highest
    stays in train). Still a pure function of the key set.
    """
    units = [_hash_unit(k) for k in keys]
    mask = [u < eval_fraction for u in units]
    if 0 < eval_fraction < 1 and len(keys) >= 2:
        if not any(mask):
            mask[int(np.argmin(units))] = True
        if all(mask):
            mask[int(np.argmax(units))] = False
    return mask


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _walk_files(root: Path, keep, section: str | None = None) -> list[Path]:
    """Regular files under ``root``, recursively, that ``keep(name, is_dir)`` accepts (it prunes
    directories too). With ``section``, a directory that cannot be listed is a ``DataError``
    naming ``<section>.data_path`` (else it is skipped)."""

    def unreadable(exc: OSError) -> None:
        if section is not None:
            raise DataError(
                f"{section}.data_path: cannot read directory {str(exc.filename or root)!r}: {exc.strerror or exc}"
            ) from exc

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if keep(d, True)]
        for name in filenames:
            path = Path(dirpath, name)
            if keep(name, False) and path.is_file():
                found.append(path)
    return found


def stdlib_files(root: Path | None = None) -> tuple[Path, list[Path]]:
    """The ``stdlib`` source's files: ``*.py`` under the running interpreter's standard library
    (or ``root``), without test modules, test directories and installed packages; with the root."""
    root = Path(root or sysconfig.get_paths()["stdlib"])

    def keep(name: str, is_dir: bool) -> bool:
        if is_dir:
            return name not in STDLIB_EXCLUDED_DIRS
        return name.endswith(".py") and not name.startswith("test_")

    return root, _walk_files(root, keep)


def _path_files(input: DataInput) -> tuple[Path, list[Path]]:
    """Files named by ``data_path`` (file, directory or glob) and the root keys are relative to."""
    sec, pattern = input.section, str(input.data_path)
    want_jsonl = input.source == "jsonl"

    def keep(name: str, is_dir: bool) -> bool:
        if name.startswith("."):
            return False
        return is_dir or not want_jsonl or name.endswith(".jsonl")

    what = "*.jsonl files" if want_jsonl else "files"
    path = Path(pattern).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = _walk_files(path, keep, sec)
        if not files:
            raise DataError(f"{sec}.data_path: directory {pattern!r} holds no {what}")
        return path, files
    if not _has_magic(pattern):
        if path.exists():  # a FIFO, socket or device: reading it could block forever
            raise DataError(f"{sec}.data_path: {pattern!r} is not a regular file or a directory")
        raise DataError(
            f"{sec}.data_path: {pattern!r} does not exist{where_looked(pattern, input)} (give a file, a directory or a glob)"
        )
    parts = path.parts
    fixed = next((i for i, p in enumerate(parts) if _has_magic(p)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    files = []
    for match in glob.glob(str(path), recursive=True):
        match_path = Path(match)
        if match_path.is_dir():
            files.extend(_walk_files(match_path, keep, sec))
        elif match_path.is_file():
            files.append(match_path)
    if not files:
        raise DataError(f"{sec}.data_path: {pattern!r} matches no {what}{where_looked(pattern, input)}")
    return root, files


def _source_files(input: DataInput) -> list[tuple[Path, str]]:
    """(path, key) of every file of the source, sorted by key (the path relative to its root)."""
    if input.source == "stdlib":
        root, files = stdlib_files()
        if not files:
            raise DataError(f"{input.section}.source: no *.py files found under stdlib {root}")
    else:
        root, files = _path_files(input)
    keyed = {p.relative_to(root).as_posix(): p for p in files}
    return [(keyed[k], k) for k in sorted(keyed)]


def _within_file_split(input: DataInput, files: Sequence[tuple[Path, str]]) -> bool:
    """True when one text/jsonl file is split inside itself rather than by file."""
    return input.source in ("text", "jsonl") and len(files) == 1


def corpus_files(input: DataInput, split: str | None = None) -> list[Path]:
    """The files that hold the documents of ``split`` (default: ``input.split``), sorted.

    A single text or jsonl file is split inside itself, so it is listed for every split.
    Raises ``DataError`` when the split holds no file.
    """
    check_input(input)
    return _split_files(input, split or split_of(input), _source_files(input), allow_empty=False)


def _split_files(input: DataInput, split: str, files: list[tuple[Path, str]], allow_empty: bool) -> list[Path]:
    if split == "all" or _within_file_split(input, files):
        return [p for p, _ in files]
    mask = _eval_mask([k for _, k in files], input.eval_fraction)
    chosen = [p for (p, _), is_eval in zip(files, mask) if is_eval == (split == "eval")]
    if not chosen and not allow_empty:
        raise DataError(
            f"{input.section}.split: the {split} split is empty ({len(files)} file(s), "
            f"eval_fraction {input.eval_fraction}); use more files, another eval_fraction "
            "or split: all"
        )
    return chosen


def _read_text(path: Path, section: str) -> str | None:
    """UTF-8 text of a file (undecodable bytes replaced), or None for a binary file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{section}.data_path: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    if b"\x00" in data:
        log.warning("%s: skipping %s: it holds NUL bytes (binary, not text)", section, path)
        return None
    return data.decode("utf-8", errors="replace")


def jsonl_records(path: Path, section: str) -> Iterator[tuple[int, int, object]]:
    """(index, line number, parsed value) of each non-blank line of a JSON Lines file; the index
    counts those lines from 0 (the within-file split hashes it). A line that is not JSON is a
    ``DataError`` naming the file and line."""
    text = _read_text(path, section)
    if text is None:
        return
    index = 0
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid JSON
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{section}.data_path: {path}:{lineno}: invalid JSON ({exc.msg}); each line must be one JSON object"
            ) from exc
        yield index, lineno, record
        index += 1


def record_field(record: object, field: str, key: str, where: str) -> str:
    """``record[field]`` as a string; missing, or not a string, is a ``DataError`` naming ``key``
    (``<section>.text_field``, ...) and ``where`` (``file:line``)."""
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{key}: {field!r} missing in {where} (found: {keys})")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{key}: {field!r} in {where} is a {type(value).__name__}, not a string")
    return value


def _jsonl_documents(path: Path, input: DataInput) -> Iterator[tuple[int, str]]:
    """(index, text) of each document of a JSON Lines file; blank lines are skipped."""
    key = f"{input.section}.text_field"
    completion = getattr(input, "completion_field", "completion")
    for index, lineno, record in jsonl_records(path, input.section):
        if isinstance(record, dict) and input.text_field not in record and completion in record:
            raise DataError(f"{key}: {input.text_field!r} missing in {path}:{lineno}, which holds {completion!r}: "
                            f"for prompt/completion samples set {input.section}.prompt_field")
        yield index, record_field(record, input.text_field, key, f"{path}:{lineno}")


def _text_documents(path: Path, input: DataInput) -> Iterator[tuple[int, str]]:
    """A text file as one document (none for a binary file)."""
    text = _read_text(path, input.section)
    if text is not None:
        yield 0, text


def split_items(
    input: DataInput, split: str, read: Callable[[Path], Iterator[tuple[int, T]]],
    allow_empty: bool = False, files: list[tuple[Path, str]] | None = None,
) -> Iterator[T]:
    """The items of ``split``: what ``read(path)`` yields, as ``(index, item)``, for each file of
    the split, in order. One jsonl file is split by item instead: item ``index`` of the file
    ``key`` is in eval when ``hash(f"{key}#{index}") < eval_fraction``. (One text file is split
    by position, in :func:`documents`.) ``files``: the source's files, if already listed."""
    files = _source_files(input) if files is None else files
    if _within_file_split(input, files):
        ((path, key),) = files
        frac = input.eval_fraction
        for index, item in read(path):
            if split == "all" or (_hash_unit(f"{key}#{index}") < frac) == (split == "eval"):
                yield item
        return
    for path in _split_files(input, split, files, allow_empty):
        yield from (item for _, item in read(path))


def iter_documents(input: DataInput, split: str | None = None) -> Iterator[str]:
    """Non-empty documents of ``split`` (default: ``input.split``), in file order.

    Raises ``DataError`` for a path matching nothing, an unreadable file, a bad jsonl line, or a
    split or corpus with no text at all.
    """
    return documents(input, split or split_of(input), allow_empty=False)


def documents(input: DataInput, split: str, allow_empty: bool) -> Iterator[str]:
    check_input(input)
    if input.source in ("shards", "hdf5"):
        raise ConfigError(f"{input.section}.source: {input.source!r} holds tokens, not documents")
    if getattr(input, "prompt_field", None) is not None:
        raise ConfigError(
            f"{input.section}.prompt_field: each record is a prompt/completion sample, not a document, and "
            "`sparsetrain prepare` writes documents: train on the .jsonl itself, or leave prompt_field out "
            f"to read its {input.text_field!r} field as documents"
        )
    files = _source_files(input)
    if input.source != "jsonl" and _within_file_split(input, files):  # one text file: by position
        text = _read_text(files[0][0], input.section) or ""
        cut = len(text) - round(len(text) * input.eval_fraction)
        docs: Iterator[str] = iter([{"all": text, "train": text[:cut], "eval": text[cut:]}[split]])
    else:
        reader = _jsonl_documents if input.source == "jsonl" else _text_documents
        docs = split_items(input, split, lambda path: reader(path, input), allow_empty, files)
    count = 0
    for doc in docs:
        if doc:
            count += 1
            yield doc
    if count == 0 and not allow_empty:
        where = "the stdlib" if input.source == "stdlib" else repr(input.data_path)
        raise DataError(
            f"{input.section}.data_path: the {split} split of {where} holds no text "
            f"(empty corpus or split; eval_fraction {input.eval_fraction})"
        )
