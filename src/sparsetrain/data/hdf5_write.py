"""Writing the model zoo's HDF5 layout from a text source (``sparsetrain prepare --format zoo-hdf5``):
``data_0.h5``, ``data_1.h5``, ... each with a dataset ``data``, readable by the zoo's
``GptHDF5MapDataProcessor`` and by :func:`~sparsetrain.data.hdf5.hdf5_stream`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrain.data.hdf5 import require_h5py
from sparsetrain.data.sources import DataInput, check_input, iter_documents, split_of
from sparsetrain.data.tokenizers import Tokenizer, encoded_chunks
from sparsetrain.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

ZOO_HDF5_FORMAT = "sparsetrain-zoo-hdf5-v1"
FORMS = ("sample", "corpus")
_OWN_NAME = re.compile(r"data_(\d+)\.h5")


def _write_h5(h5py: Any, path: Path, data: np.ndarray, attrs: dict[str, Any]) -> None:
    """``path`` with dataset ``data`` and ``attrs``, atomically (a hidden temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("data", data=data)
            for name, value in attrs.items():
                f.attrs[name] = value
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _files(chunks: Iterable[np.ndarray], seq_len: int, samples_per_file: int, form: str) -> Iterable[np.ndarray]:
    """The ``data`` array of each file, in order, from the encoded token stream.

    Sample form: windows of ``seq_len + 1`` tokens with stride ``seq_len`` (a token stream's
    windows), rows input = window[:-1], mask = 1, labels = window[1:]; the last file may be short
    and tokens after the last full window are dropped. Corpus form: the tokens themselves, in
    pieces of ``samples_per_file * seq_len``, none dropped.
    """
    per_file = samples_per_file * seq_len
    need = per_file + 1 if form == "sample" else per_file
    pending: list[np.ndarray] = []
    held = 0

    def sample_rows(tokens: np.ndarray) -> np.ndarray:
        n = (len(tokens) - 1) // seq_len
        x = tokens[: n * seq_len].reshape(n, seq_len)
        y = tokens[1 : n * seq_len + 1].reshape(n, seq_len)
        return np.stack([x, np.ones_like(x), y], axis=1)

    for chunk in chunks:
        pending.append(chunk.astype(np.int32))
        held += len(chunk)
        while held >= need:
            tokens = np.concatenate(pending)
            yield sample_rows(tokens[:need]) if form == "sample" else tokens[:need]
            rest = tokens[per_file:]  # the sample form's last token starts the next window too
            pending, held = [rest], len(rest)
    tokens = np.concatenate(pending) if pending else np.empty(0, np.int32)
    if form == "corpus" and len(tokens):
        yield tokens
    elif form == "sample" and len(tokens) > seq_len:
        yield sample_rows(tokens)


def prepare_zoo_hdf5(
    input: DataInput,
    tokenizer: Tokenizer,
    out_dir: Path,
    seq_len: int,
    samples_per_file: int = 50_000,
    split: str | None = None,
    *,
    form: str = "sample",
) -> list[Path]:
    """Encode a text source's ``split`` into the zoo's HDF5 layout in ``out_dir``; returns the files.

    Documents are encoded like :func:`~sparsetrain.data.loading.encode_corpus` (end-of-text between
    them). ``form="sample"``: ``data`` of shape (n, 3, seq_len), int32, rows input ids / loss
    mask (all ones) / labels (inputs shifted by one), the windows a token stream of the same
    tokens has, ``samples_per_file`` per file, attribute ``n_examples``. ``form="corpus"``: ``data``
    of shape (num_tokens,), ``samples_per_file * seq_len`` tokens per file. Each file carries a
    ``meta`` attribute (JSON: tokenizer, form, source) and is written atomically; a tokenizer.json
    is saved beside them (not for ``byte``). ``data_<n>.h5`` left over from an earlier, longer run
    are removed; other .h5 files in ``out_dir`` are an error (a reader takes every ``*.h5``).
    """
    check_input(input)
    if input.source in ("shards", "hdf5"):
        raise ConfigError(f"{input.section}.source: prepare reads a text source, not {input.source!r}")
    if form not in FORMS:
        raise ConfigError(f"form: {form!r} is not one of {', '.join(FORMS)}")
    if seq_len < 1 or samples_per_file < 1:
        raise ConfigError(f"seq_len {seq_len} and samples_per_file {samples_per_file} must be at least 1")
    if tokenizer.vocab_size > 2**31:
        raise ConfigError(f"{input.section}.tokenizer: vocab_size {tokenizer.vocab_size} does not fit int32 ids")
    h5py = require_h5py(f"{input.section}.source")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out_dir.glob("*.h5") if not _OWN_NAME.fullmatch(p.name))
    if foreign:
        raise DataError(f"{out_dir}: holds other .h5 files ({', '.join(foreign[:3])}); use an empty directory")
    split = split or split_of(input)
    meta = json.dumps(
        {
            "format": ZOO_HDF5_FORMAT,
            "form": form,
            "seq_len": seq_len,
            "tokenizer": tokenizer.spec,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "source": {"source": input.source, "data_path": input.data_path, "split": split},
        }
    )
    chunks = encoded_chunks(tokenizer, iter_documents(input, split))
    written: list[Path] = []
    rows = 0
    for data in _files(chunks, seq_len, samples_per_file, form):
        path = out_dir / f"data_{len(written)}.h5"
        attrs = {"n_examples": len(data), "meta": meta} if form == "sample" else {"meta": meta}
        _write_h5(h5py, path, data, attrs)
        written.append(path)
        rows += len(data)
    if not written:
        raise DataError(
            f"{input.section}.data_path: the {split} split holds fewer than seq_len + 1 = {seq_len + 1} tokens"
        )
    for old in out_dir.glob("data_*.h5"):
        match = _OWN_NAME.fullmatch(old.name)
        if match and int(match.group(1)) >= len(written):
            log.info("prepare: removing %s, left from an earlier run", old)
            old.unlink()
    tokenizer.save(out_dir / "tokenizer.json")
    what = "samples" if form == "sample" else "tokens"
    log.info("prepare: %d %s of the %s split in %d file(s) in %s", rows, what, split, len(written), out_dir)
    return written
