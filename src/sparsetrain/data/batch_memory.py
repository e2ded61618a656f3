"""Whether one batch fits this machine's memory, checked by arithmetic before anything is
allocated: a typo'd ``batch_size`` gets one line naming the key and the bytes it would need,
instead of numpy's allocation traceback or the OOM killer."""

from __future__ import annotations

import logging
import os
from typing import Protocol

import numpy as np

from sparsetrain.errors import ConfigError

log = logging.getLogger(__name__)

_ROW_INDEX_BYTES = 128  # per row of a batch being built: int64 positions, draws, starts and their lists


class Rows(Protocol):
    """What a batch check needs of the data (any ``data.stream.Stream``)."""

    seq_len: int | None

    def num_rows(self, seq_len: int) -> int: ...


class BatchInput(Protocol):
    """The keys of a data section a batch's size depends on (``config.sections.InputParams``)."""

    section: str
    batch_size: int
    max_sequence_length: int | None


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say (no sysconf)."""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page if pages > 0 and page > 0 else None


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024:
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:,.1f} PiB"


def batch_bytes(rows: int, seq_len: int) -> int:
    """Bytes a batch of ``rows`` sequences takes while it is built: inputs and targets as int64
    (rows, seq_len) each -- the readers write windows straight into them -- and the row indices
    (a mixture briefly holds a dataset's rows twice)."""
    return rows * (2 * seq_len * np.dtype(np.int64).itemsize + _ROW_INDEX_BYTES)


def check_batch_memory(rows: int, seq_len: int, section: str) -> None:
    """Raise a one-line ``ConfigError`` if ``rows`` sequences of ``seq_len`` cannot fit this machine."""
    memory = physical_memory()
    need = batch_bytes(rows, seq_len)
    if memory is None or need <= memory:
        return
    raise ConfigError(
        f"{section}.batch_size: one batch of {rows:,} sequences of {seq_len:,} tokens needs {_size(need)} "
        f"(inputs and targets, int64), more than this machine's {_size(memory)} of memory; at most "
        f"{memory // batch_bytes(1, seq_len):,} would fill it, use far fewer"
    )


def check_batch_fits(section: BatchInput, stream: Rows | None = None) -> None:
    """Raise a one-line ``ConfigError`` if one batch of ``section`` cannot fit this machine's memory.

    Without it a typo'd ``batch_size`` ends in numpy's allocation traceback or the OOM killer.
    Arithmetic only, so setup may call it before any data is read; ``load_tokens``, ``get_batch``
    and ``eval_batches`` call it too. Skipped where the memory is unknown. Evaluation reads no
    more rows than its data holds (one short batch), so ``eval_input`` is checked once ``stream``
    is given. With ``stream``, a batch larger than the data is allowed and warned about: training
    then repeats rows within a batch (wrapping around, or drawn again).
    """
    seq_len = section.max_sequence_length or (stream.seq_len if stream is not None else None)
    if seq_len is None:  # hdf5 samples: the length comes with the data
        return
    rows, evaluation = section.batch_size, section.section == "eval_input"
    if stream is not None:
        held = stream.num_rows(seq_len)
        if section.batch_size > held:
            what = f"evaluation reads one batch of {held:,}" if evaluation else "each batch repeats rows"
            log.warning(
                "%s.batch_size: %s sequences per batch, more than the %s the data holds; %s",
                section.section, f"{section.batch_size:,}", f"{held:,}", what,
            )
        rows = min(rows, held) if evaluation else rows
    elif evaluation:
        return
    check_batch_memory(rows, seq_len, section.section)
