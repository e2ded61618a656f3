"""Token streams and batches: the token ids of one split, and batches drawn from them.

Batches are a pure function of ``(seed, step, rank)``: there is no loader state to checkpoint and
a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from sparsetrain.errors import DataError

log = logging.getLogger(__name__)

_SCAN_CHUNK_TOKENS = 1 << 24  # check_vocab reads memory maps in pieces of 16M tokens


class TokenStream:
    """Token ids of one split: one or more 1-D arrays (in memory or memory-mapped).

    A window of ``seq_len + 1`` tokens never crosses from one array into the next. Windows are
    numbered across arrays in order; window ``i`` of an array starts at token ``i * seq_len``, so
    consecutive windows share one token (the last target of one is the first input of the next)
    and ``(n - 1) // seq_len`` windows fit in an array of ``n`` tokens.
    """

    def __init__(
        self,
        arrays: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        vocab_size: int | None = None,
    ):
        assert all(a.ndim == 1 for a in arrays), "token arrays must be 1-D"
        self.arrays = list(arrays)
        self.names = list(names) if names is not None else [f"array{i}" for i in range(len(arrays))]
        self.vocab_size = vocab_size
        self._max_token: int | None = None
        self._layout: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._segments: dict[tuple[int, int, int], tuple[np.ndarray, ...]] = {}

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[0].dtype if self.arrays else np.dtype(np.uint16)

    def tokens(self) -> np.ndarray:
        """All tokens as one in-memory array (for small streams and tests)."""
        if not self.arrays:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate([np.asarray(a) for a in self.arrays])

    def max_token(self) -> int:
        """Largest token id (-1 if empty), read in chunks so a memory map is never loaded whole."""
        if self._max_token is None:
            best = -1
            for a in self.arrays:
                for lo in range(0, len(a), _SCAN_CHUNK_TOKENS):
                    best = max(best, int(a[lo : lo + _SCAN_CHUNK_TOKENS].max()))
            self._max_token = best
        return self._max_token

    def _window_layout(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows per array and the global index of each array's first window."""
        if seq_len not in self._layout:
            counts = np.array([max(0, (len(a) - 1) // seq_len) for a in self.arrays], np.int64)
            firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            self._layout[seq_len] = (counts, firsts)
        return self._layout[seq_len]

    def num_windows(self, seq_len: int) -> int:
        return int(self._window_layout(seq_len)[0].sum())

    def window_starts(self, windows: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(array index, token offset) of each global window index."""
        counts, firsts = self._window_layout(seq_len)
        arr = np.searchsorted(firsts + counts, windows, side="right")
        return arr, (windows - firsts[arr]) * seq_len

    def read(self, arr: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
        """Token rows ``arrays[arr[i]][starts[i] : starts[i] + length]`` as int64, (B, length)."""
        rows = [self.arrays[a][s : s + length] for a, s in zip(arr.tolist(), starts.tolist())]
        return np.stack(rows).astype(np.int64)

    def rank_segments(self, seq_len: int, rank: int, world_size: int) -> tuple[np.ndarray, ...]:
        """Where ``rank`` may start a random window: (array, first start, number of starts).

        The windows are cut into ``world_size`` contiguous ranges; a random window of a rank lies
        inside the token span of its range, so the inputs of two ranks never overlap.
        """
        key = (seq_len, rank, world_size)
        if key not in self._segments:
            total = self.num_windows(seq_len)
            lo_w, hi_w = rank * total // world_size, (rank + 1) * total // world_size
            counts, firsts = self._window_layout(seq_len)
            arrs, los, nstarts = [], [], []
            for a, (count, first) in enumerate(zip(counts.tolist(), firsts.tolist())):
                lo, hi = max(lo_w, first), min(hi_w, first + count)
                if lo < hi:
                    arrs.append(a)
                    los.append((lo - first) * seq_len)
                    nstarts.append((hi - lo - 1) * seq_len + 1)
            self._segments[key] = (np.array(arrs), np.array(los), np.array(nstarts, np.int64))
        return self._segments[key]


def check_length(stream: TokenStream, max_sequence_length: int, section: str) -> None:
    """Raise ``DataError`` unless one window of ``max_sequence_length + 1`` tokens fits."""
    if stream.num_windows(max_sequence_length) == 0:
        longest = max((len(a) for a in stream.arrays), default=0)
        raise DataError(
            f"{section}.max_sequence_length: the data holds {stream.num_tokens} tokens (longest "
            f"file {longest}), fewer than one sequence of max_sequence_length + 1 = "
            f"{max_sequence_length + 1}; use more data or a shorter sequence"
        )


def check_vocab(stream: TokenStream, vocab_size: int, section: str) -> None:
    """Raise ``DataError`` if a token id of ``stream`` does not fit a model of ``vocab_size``."""
    top = stream.max_token()
    if top >= vocab_size:
        tok = f", tokenizer vocab {stream.vocab_size}" if stream.vocab_size else ""
        raise DataError(
            f"{section}: token id {top} does not fit model.vocab_size {vocab_size}{tok}; "
            f"set model.vocab_size to at least {top + 1}"
        )


def _check_batch_args(stream: TokenStream, seq_len: int, rank: int, world_size: int) -> int:
    if seq_len < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch arguments: seq_len {seq_len}, rank {rank}/{world_size}")
    total = stream.num_windows(seq_len)
    if total < world_size:
        raise DataError(
            f"the data holds {total} sequence(s) of {seq_len + 1} tokens, fewer than the "
            f"{world_size} processes; use more data or a shorter max_sequence_length"
        )
    return total


def _to_xy(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.from_numpy(rows)  # (B, T + 1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T), (B, T)


def get_batch(
    stream: TokenStream,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    step: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of ``rank``: int64 CPU tensors x, y of shape (B, T); y is x shifted by one.

    A pure function of its arguments, so resuming at ``step`` needs no saved loader state.
    ``shuffle``: window starts drawn at any token offset by ``default_rng([seed, step, rank])``
    inside this rank's own contiguous part of the stream. Otherwise consecutive windows in order,
    batch ``step * world_size + rank``, wrapping around at the end.
    """
    total = _check_batch_args(stream, seq_len, rank, world_size)
    if shuffle:
        arrs, los, nstarts = stream.rank_segments(seq_len, rank, world_size)
        ends = np.cumsum(nstarts)
        picks = np.random.default_rng([seed, step, rank]).integers(0, ends[-1], size=batch_size)
        seg = np.searchsorted(ends, picks, side="right")
        starts = los[seg] + picks - (ends[seg] - nstarts[seg])
        rows = stream.read(arrs[seg], starts, seq_len + 1)
    else:
        first = (step * world_size + rank) * batch_size
        windows = (first + np.arange(batch_size, dtype=np.int64)) % total
        rows = stream.read(*stream.window_starts(windows, seq_len), seq_len + 1)
    return _to_xy(rows)


def eval_batches(
    stream: TokenStream,
    batch_size: int,
    seq_len: int,
    num_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows from the start, as batches; rank r takes batches r, r + world_size, ...

    Every rank yields the same number of batches: ``num_batches`` (capped at what the data
    holds) or, with None, all full batches. A stream with fewer windows than that yields one
    smaller batch per rank rather than nothing.
    """
    total = _check_batch_args(stream, seq_len, rank, world_size)
    available = total // batch_size // world_size
    if available == 0:
        share = total // world_size
        windows = rank * share + np.arange(min(batch_size, share), dtype=np.int64)
        yield _to_xy(stream.read(*stream.window_starts(windows, seq_len), seq_len + 1))
        return
    count = available if num_batches is None else min(num_batches, available)
    if num_batches is not None and num_batches > available:
        log.warning("eval: %d batches asked, the data holds %d per process", num_batches, count)
    for k in range(count):
        first = (k * world_size + rank) * batch_size
        windows = first + np.arange(batch_size, dtype=np.int64)
        yield _to_xy(stream.read(*stream.window_starts(windows, seq_len), seq_len + 1))
