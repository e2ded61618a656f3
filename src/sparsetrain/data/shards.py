"""Token shards: a text source tokenized once (``sparsetrain prepare``) into memory-mapped
``train_NNN.bin`` / ``eval_NNN.bin`` files and a ``meta.json``, and read back as token streams.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrain.data.sources import DataInput, check_input, documents, iter_documents, split_of
from sparsetrain.data.stream import TokenStream
from sparsetrain.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    encoded_chunks,
    make_tokenizer,
    token_dtype,
)
from sparsetrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SHARD_FORMAT = "sparsetrain-shards-v1"


class _ShardWriter:
    """Writes ``<prefix>_000.bin``, ... of at most ``shard_tokens`` each, each atomically."""

    def __init__(self, out_dir: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.prefix, self.dtype = out_dir, prefix, dtype
        self.shard_tokens = shard_tokens
        self.files: list[str] = []
        self.num_tokens = 0
        self._handle = None
        self._filled = 0

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.files):03d}.bin"
        self.files.append(name)
        self._handle = open(self.out_dir / f".{name}.tmp", "wb")  # closed in _close / abort
        self._filled = 0

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            name = self.files[-1]
            os.replace(self.out_dir / f".{name}.tmp", self.out_dir / name)
            self._handle = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._handle is None or self._filled == self.shard_tokens:
                self._close()
                self._open()
            take = min(len(tokens), self.shard_tokens - self._filled)
            tokens[:take].tofile(self._handle)
            self._filled += take
            self.num_tokens += take
            tokens = tokens[take:]

    def finish(self) -> list[str]:
        self._close()
        return self.files

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            (self.out_dir / f".{self.files[-1]}.tmp").unlink(missing_ok=True)
            self._handle = None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_shards(
    input: DataInput,
    out_dir: Path,
    tokenizer_spec: str,
    bpe_vocab_size: int,
    shard_tokens: int = 100_000_000,
) -> dict[str, Any]:
    """Tokenize a text source once into ``out_dir``: train/eval ``.bin`` shards and meta.json.

    The split follows ``input.eval_fraction`` (``input.split`` is ignored: both are written).
    A BPE tokenizer is trained on the train split; the tokenizer used is saved as
    ``out_dir/tokenizer.json``. meta.json is written last, so a directory without it is
    incomplete. Returns the meta dict.
    """
    check_input(input)
    if input.source == "shards":
        raise ConfigError(f"{input.section}.source: prepare reads a text source, not 'shards'")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens: {shard_tokens} must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # an interrupted prepare leaves no valid directory
    key = f"{input.section}.tokenizer"
    texts = iter_documents(input, "train") if tokenizer_spec == "bpe" else None
    tokenizer = make_tokenizer(tokenizer_spec, bpe_vocab_size, key, texts)
    tokenizer.save(out_dir / "tokenizer.json")
    dtype = token_dtype(tokenizer.vocab_size)
    files, counts = {}, {}
    for split in ("train", "eval"):
        writer = _ShardWriter(out_dir, split, dtype, shard_tokens)
        try:
            docs = documents(input, split, allow_empty=split == "eval")
            for chunk in encoded_chunks(tokenizer, docs):
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        files[split], counts[split] = writer.finish(), writer.num_tokens
        log.info("prepare: %s: %d tokens in %d shard(s)", split, counts[split], len(files[split]))
    if counts["eval"] == 0:
        log.warning("prepare: the eval split is empty (eval_fraction %s)", input.eval_fraction)
    if counts["train"] == 0:
        raise DataError(f"{input.section}.data_path: the train split holds no text")
    meta = {
        "format": SHARD_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": tokenizer.spec,
        "num_tokens": counts,
        "files": files,
        "source": {
            "source": input.source,
            "data_path": input.data_path,
            "text_field": input.text_field,
            "eval_fraction": input.eval_fraction,
        },
    }
    _write_json(out_dir / "meta.json", meta)
    return meta


def read_shard_meta(shard_dir: Path, section: str) -> dict[str, Any]:
    """meta.json of a shard directory, validated; errors name the file and ``<section>.data_path``."""
    path = Path(shard_dir) / "meta.json"
    key = f"{section}.data_path"
    if not Path(shard_dir).is_dir():
        raise DataError(f"{key}: {str(shard_dir)!r} is not a directory (source: shards)")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{key}: {path} not found; write shards with `sparsetrain prepare`") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{key}: {path} is not readable JSON ({exc})") from exc
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{key}: {path} is invalid: {problem}")
    return meta


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") != SHARD_FORMAT:
        return f"format is {meta.get('format')!r}, expected {SHARD_FORMAT!r}"
    for name in ("dtype", "vocab_size", "eos_id", "tokenizer", "num_tokens", "files"):
        if name not in meta:
            return f"missing key {name!r}"
    if meta["tokenizer"] not in ("byte", "tokenizer.json"):
        return f"tokenizer {meta['tokenizer']!r} is not 'byte' or 'tokenizer.json'"
    if not isinstance(meta["vocab_size"], int) or not isinstance(meta["eos_id"], int):
        return "vocab_size and eos_id must be integers"
    for name in ("files", "num_tokens"):
        for split in ("train", "eval"):
            value = meta[name].get(split) if isinstance(meta[name], dict) else None
            if not isinstance(value, list if name == "files" else int):
                return f"{name}.{split} is missing or of the wrong type"
    if meta["dtype"] not in ("uint16", "uint32"):
        return f"dtype {meta['dtype']!r} is not uint16 or uint32"
    if np.iinfo(meta["dtype"]).max < meta["vocab_size"] - 1:
        return f"dtype {meta['dtype']} cannot hold vocab_size {meta['vocab_size']}"
    return None


def shard_tokenizer(input: DataInput) -> Tokenizer:
    """The tokenizer recorded with the shards; ``input.tokenizer`` must describe the same one."""
    shard_dir = Path(str(input.data_path))
    meta = read_shard_meta(shard_dir, input.section)
    key = f"{input.section}.tokenizer"
    if meta["tokenizer"] == "byte":
        if input.tokenizer != "byte":
            raise DataError(
                f"{key}: {input.tokenizer!r} differs from the shards' tokenizer 'byte' "
                f"({shard_dir / 'meta.json'}); use tokenizer: byte"
            )
        tok: Tokenizer = ByteTokenizer()
    else:
        tok = HFTokenizer.load(shard_dir / "tokenizer.json", key)
        same = input.tokenizer == "bpe" or (
            input.tokenizer != "byte"
            and HFTokenizer.load(Path(input.tokenizer).expanduser(), key).to_json() == tok.to_json()
        )
        if not same:
            raise DataError(
                f"{key}: {input.tokenizer!r} differs from the shards' tokenizer "
                f"{shard_dir / 'tokenizer.json'}; use tokenizer: bpe (or that file's path)"
            )
    if (tok.vocab_size, tok.eos_id) != (meta["vocab_size"], meta["eos_id"]):
        raise DataError(
            f"{input.section}.data_path: {shard_dir / 'meta.json'} records vocab_size "
            f"{meta['vocab_size']} / eos_id {meta['eos_id']}, its tokenizer has "
            f"{tok.vocab_size} / {tok.eos_id}"
        )
    return tok


def shard_stream(input: DataInput) -> TokenStream:
    """Memory maps (read-only) of the split's shard files."""
    shard_dir = Path(str(input.data_path))
    meta = read_shard_meta(shard_dir, input.section)
    split = split_of(input)
    splits = ("train", "eval") if split == "all" else (split,)
    names = [name for part in splits for name in meta["files"][part]]
    if not names:
        raise DataError(
            f"{input.section}.split: {shard_dir} holds no {split} shards (files.{split} in meta.json is empty)"
        )
    dtype = np.dtype(meta["dtype"])
    arrays = [_map_shard(shard_dir / name, dtype, input.section) for name in names]
    expected = sum(meta["num_tokens"][part] for part in splits)
    if sum(len(a) for a in arrays) != expected:
        raise DataError(
            f"{input.section}.data_path: the {split} shards in {shard_dir} hold "
            f"{sum(len(a) for a in arrays)} tokens, meta.json records {expected} (truncated?)"
        )
    return TokenStream(arrays, names, meta["vocab_size"])


def _map_shard(path: Path, dtype: np.dtype, section: str) -> np.ndarray:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(
            f"{section}.data_path: shard {path} listed in meta.json cannot be read ({exc.strerror or exc})"
        ) from exc
    if size % dtype.itemsize:
        raise DataError(
            f"{section}.data_path: shard {path} has {size} bytes, not a whole number of "
            f"{dtype.name} tokens (truncated?)"
        )
    if size == 0:
        return np.empty(0, dtype=dtype)
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as exc:
        raise DataError(
            f"{section}.data_path: shard {path} listed in meta.json cannot be read ({exc.strerror or exc})"
        ) from exc
