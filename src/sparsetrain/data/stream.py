"""Streams and batches: the token ids of one split, and batches drawn from them.

A :class:`TokenStream` holds 1-D token arrays cut into windows of any length; a
:class:`SampleStream` holds fixed-length samples (input ids, loss mask, labels), the model zoo's
HDF5 sample form and that of prompt/completion records (:mod:`~sparsetrain.data.completions`);
a :class:`MixtureStream` draws each row from one of several streams by weight.
Batches are a pure function of ``(seed, step, rank)``: there is no loader state to checkpoint and
a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from sparsetrain.data.batch_memory import check_batch_memory
from sparsetrain.errors import DataError

log = logging.getLogger(__name__)

_SCAN_CHUNK_TOKENS = 1 << 24  # check_vocab reads memory maps in pieces of 16M tokens
IGNORE_INDEX = -100  # a target the model's cross entropy leaves out (the zoo's loss mask 0)
_CACHED_PERMUTATIONS = 4  # epoch permutations a sample stream keeps


@dataclass(frozen=True)
class Draw:
    """What the rows of a training batch depend on besides their positions (see :func:`get_batch`)."""

    seed: int
    step: int
    shuffle: bool
    rank: int = 0
    world_size: int = 1
    salt: tuple[int, ...] = ()  # a mixture appends the dataset's index


class TokenStream:
    """Token ids of one split: one or more 1-D arrays (in memory, memory-mapped or h5py datasets).

    A window of ``seq_len + 1`` tokens never crosses from one array into the next. Windows are
    numbered across arrays in order; window ``i`` of an array starts at token ``i * seq_len``, so
    consecutive windows share one token (the last target of one is the first input of the next)
    and ``(n - 1) // seq_len`` windows fit in an array of ``n`` tokens.
    """

    seq_len: int | None = None  # windows of any length

    def __init__(self, arrays: Sequence[Any], names: Sequence[str] | None = None, vocab_size: int | None = None):
        assert all(a.ndim == 1 for a in arrays), "token arrays must be 1-D"
        self.arrays = list(arrays)
        self.names = list(names) if names is not None else [f"array{i}" for i in range(len(arrays))]
        self.vocab_size = vocab_size
        self._range: tuple[int, int] | None = None
        self._layout: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._segments: dict[tuple[int, int, int], tuple[np.ndarray, ...]] = {}

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.arrays[0].dtype) if self.arrays else np.dtype(np.uint16)

    def tokens(self) -> np.ndarray:
        """All tokens as one in-memory array (for small streams and tests)."""
        if not self.arrays:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate([np.asarray(a) for a in self.arrays])

    def _scan(self) -> tuple[int, int]:
        """(smallest, largest) token id, read in chunks so a memory map is never loaded whole."""
        if self._range is None:
            low, top = 0, -1
            signed = self.dtype.kind == "i"
            for a in self.arrays:
                for lo in range(0, len(a), _SCAN_CHUNK_TOKENS):
                    chunk = np.asarray(a[lo : lo + _SCAN_CHUNK_TOKENS])
                    top = max(top, int(chunk.max()))
                    low = min(low, int(chunk.min())) if signed else low
            self._range = (low, top)
        return self._range

    def max_token(self) -> int:
        return self._scan()[1]  # -1 if empty

    def min_token(self) -> int:
        return self._scan()[0]  # 0 unless an id is negative

    def _window_layout(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows per array and the global index of each array's first window."""
        if seq_len not in self._layout:
            counts = np.array([max(0, (len(a) - 1) // seq_len) for a in self.arrays], np.int64)
            firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            self._layout[seq_len] = (counts, firsts)
        return self._layout[seq_len]

    def num_windows(self, seq_len: int) -> int:
        return int(self._window_layout(seq_len)[0].sum())

    num_rows = num_windows

    def window_starts(self, windows: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(array index, token offset) of each global window index."""
        counts, firsts = self._window_layout(seq_len)
        arr = np.searchsorted(firsts + counts, windows, side="right")
        return arr, (windows - firsts[arr]) * seq_len

    def read_xy(self, arr: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the windows ``arrays[arr[i]][starts[i] : starts[i] + seq_len + 1]``: int64 (B,
        seq_len), y shifted by one. Each window is copied straight into x and y, so a batch holds
        no more than those two arrays (see :func:`~sparsetrain.data.batch_memory.batch_bytes`)."""
        x = np.empty((len(starts), seq_len), np.int64)
        y = np.empty_like(x)
        for i, (a, s) in enumerate(zip(arr.tolist(), starts.tolist())):
            window = self.arrays[a][s : s + seq_len + 1]
            x[i], y[i] = window[:-1], window[1:]
        return x, y

    def rows(self, windows: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the global windows ``windows``: int64 (n, seq_len), y is x shifted by one."""
        return self.read_xy(*self.window_starts(windows, seq_len), seq_len)

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
            self._segments[key] = (np.array(arrs, np.int64), np.array(los, np.int64), np.array(nstarts, np.int64))
        return self._segments[key]

    def draw(self, positions: np.ndarray, seq_len: int, how: Draw) -> tuple[np.ndarray, np.ndarray]:
        """Rows of a training batch (see :func:`get_batch`); ``positions`` count only with shuffle off.

        ``shuffle``: a window start at any token offset per row, from ``default_rng([seed, step,
        rank, *salt])``, inside this rank's part of the stream. Else windows ``positions`` mod total.
        """
        if not how.shuffle:
            return self.rows(positions % self.num_windows(seq_len), seq_len)
        arrs, los, nstarts = self.rank_segments(seq_len, how.rank, how.world_size)
        ends = np.cumsum(nstarts)
        rng = np.random.default_rng([how.seed, how.step, how.rank, *how.salt])
        picks = rng.integers(0, ends[-1], size=len(positions))
        seg = np.searchsorted(ends, picks, side="right")
        return self.read_xy(arrs[seg], los[seg] + picks - (ends[seg] - nstarts[seg]), seq_len)


class SampleStream:
    """Fixed-length samples: arrays of shape (N, 3, T) whose rows are input ids, loss mask, labels.

    The zoo's HDF5 sample form; arrays may be h5py datasets, read a batch's rows at a time.
    ``pieces`` are the rows kept, in order, as (array, first row, end row): by default all rows
    (the zoo's ``n_examples`` and ``data_subset`` keep fewer). Samples are numbered across the
    pieces. Targets are the labels, with -100 where the loss mask is 0.
    """

    vocab_size: int | None = None

    def __init__(
        self,
        arrays: Sequence[Any],
        names: Sequence[str] | None = None,
        pieces: Sequence[tuple[int, int, int]] | None = None,
    ):
        assert arrays and all(a.ndim == 3 and a.shape[1] == 3 for a in arrays), "sample arrays must be (N, 3, T)"
        assert len({a.shape[2] for a in arrays}) == 1, "samples of one stream must have one length"
        self.arrays = list(arrays)
        self.names = list(names) if names is not None else [f"array{i}" for i in range(len(arrays))]
        self.seq_len = int(arrays[0].shape[2])
        if pieces is None:
            pieces = [(k, 0, a.shape[0]) for k, a in enumerate(arrays)]
        self.pieces = [(int(k), int(lo), int(hi)) for k, lo, hi in pieces if hi > lo]
        assert all(0 <= lo < hi <= arrays[k].shape[0] for k, lo, hi in self.pieces), "rows outside the arrays"
        self._ends = np.cumsum([hi - lo for _, lo, hi in self.pieces], dtype=np.int64)
        self.num_samples = int(self._ends[-1]) if self.pieces else 0
        self._range: tuple[int, int] | None = None
        self._perms: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def num_rows(self, seq_len: int) -> int:
        return self.num_samples

    def rows(self, samples: np.ndarray, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of kept samples ``samples``: inputs and labels (-100 where the mask is 0), int64."""
        samples = np.asarray(samples, np.int64)
        piece = np.searchsorted(self._ends, samples, side="right")
        x = np.empty((len(samples), self.seq_len), np.int64)
        y = np.empty_like(x)
        step = max(1, _SCAN_CHUNK_TOKENS // (3 * self.seq_len))  # rows a read: bounded, whatever B
        for p in np.unique(piece).tolist():
            k, lo, hi = self.pieces[p]
            sel = np.flatnonzero(piece == p)
            rows = lo + samples[sel] - (self._ends[p] - (hi - lo))
            wanted, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing indices
            order = np.argsort(inverse, kind="stable")
            by_row = inverse[order]
            for first in range(0, len(wanted), step):
                a, b = np.searchsorted(by_row, [first, first + step])
                block = np.asarray(self.arrays[k][wanted[first : first + step]])[by_row[a:b] - first]
                dest = sel[order[a:b]]
                x[dest] = block[:, 0]
                y[dest] = np.where(block[:, 1] != 0, block[:, 2].astype(np.int64), IGNORE_INDEX)  # uint: no wrap
        return x, y

    def _scan(self) -> tuple[int, int]:
        """(smallest, largest) id of the inputs and counted labels, read in chunks."""
        if self._range is None:
            low, top = 0, -1
            step = max(1, _SCAN_CHUNK_TOKENS // (3 * self.seq_len))
            for k, first, end in self.pieces:
                for lo in range(first, end, step):
                    block = np.asarray(self.arrays[k][lo : min(end, lo + step)])
                    counted = block[:, 1] != 0
                    x, labels = block[:, 0], block[:, 2].astype(np.int64)  # uint ids: -1 must not wrap
                    top = max(top, int(x.max()), int(np.where(counted, labels, -1).max()))
                    low = min(low, int(x.min()), int(np.where(counted, labels, 0).min()))
            self._range = (low, top)
        return self._range

    def max_token(self) -> int:
        return self._scan()[1]  # inputs and counted labels; -1 if empty

    def min_token(self) -> int:
        return self._scan()[0]  # 0 unless an id is negative

    def _permutation(self, n: int, epoch: int, seed: int, salt: tuple[int, ...]) -> np.ndarray:
        """Order of ``n`` samples in ``epoch``: ``default_rng([seed, epoch, *salt])``, cached."""
        key = (n, epoch, seed, salt)
        if key not in self._perms:
            perm = np.random.default_rng([seed, epoch, *salt]).permutation(n)
            self._perms[key] = perm.astype(np.int32 if n < 2**31 else np.int64)
            while len(self._perms) > _CACHED_PERMUTATIONS:
                self._perms.popitem(last=False)
        self._perms.move_to_end(key)
        return self._perms[key]

    def draw(self, positions: np.ndarray, seq_len: int, how: Draw) -> tuple[np.ndarray, np.ndarray]:
        """Rows at ``positions`` of this rank's order of samples (see :func:`get_batch`).

        ``shuffle``: rank r owns the contiguous samples ``[r N / W, (r + 1) N / W)`` and walks them
        epoch after epoch, each epoch in the order of ``_permutation``; position p is sample
        ``perm_{p // n}[p % n]`` of its part. Else samples ``positions`` mod N, in order.
        """
        if not how.shuffle:
            return self.rows(positions % self.num_samples)
        lo = how.rank * self.num_samples // how.world_size
        n = (how.rank + 1) * self.num_samples // how.world_size - lo
        epochs, offsets = positions // n, positions % n
        samples = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            samples[sel] = lo + self._permutation(n, epoch, how.seed, how.salt)[offsets[sel]]
        return self.rows(samples)


class MixtureStream:
    """Datasets drawn by weight: a row comes from stream d with probability ``w_d / sum(w)``.

    All streams share one ``seq_len`` (None for token streams). For evaluation the streams of
    positive weight are read one after another (their rows concatenated, in order).
    """

    vocab_size: int | None = None

    def __init__(self, streams: Sequence[Stream], weights: Sequence[float], names: Sequence[str] | None = None):
        assert streams and len(streams) == len(weights) and sum(weights) > 0 and min(weights) >= 0
        assert len({s.seq_len for s in streams}) == 1, "the streams of a mixture must have one seq_len"
        self.streams = list(streams)
        self.weights = np.array(weights, np.float64) / float(sum(weights))
        self.names = list(names) if names is not None else [f"dataset{i}" for i in range(len(streams))]
        self.seq_len = streams[0].seq_len

    @property
    def parts(self) -> list[Stream]:
        """The streams that can be drawn (positive weight)."""
        return [s for s, w in zip(self.streams, self.weights.tolist()) if w > 0]

    def num_rows(self, seq_len: int) -> int:
        return sum(s.num_rows(seq_len) for s in self.parts)

    def max_token(self) -> int:
        return max(s.max_token() for s in self.parts)

    def min_token(self) -> int:
        return min(s.min_token() for s in self.parts)

    def rows(self, indices: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of rows ``indices`` of the concatenated parts (evaluation)."""
        parts = self.parts
        ends = np.cumsum([s.num_rows(seq_len) for s in parts])
        which = np.searchsorted(ends, indices, side="right")
        x = np.empty((len(indices), seq_len), np.int64)
        y = np.empty_like(x)
        for d in np.unique(which).tolist():
            sel = np.flatnonzero(which == d)
            x[sel], y[sel] = parts[d].rows(indices[sel] - (ends[d] - parts[d].num_rows(seq_len)), seq_len)
        return x, y

    def draw(self, positions: np.ndarray, seq_len: int, how: Draw) -> tuple[np.ndarray, np.ndarray]:
        """Row i's stream d drawn by weight from ``default_rng([seed, step, rank, *salt])``; the row
        is then what stream d draws at ``positions[i]`` with ``salt + (d,)`` (see :func:`get_batch`)."""
        rng = np.random.default_rng([how.seed, how.step, how.rank, *how.salt])
        which = rng.choice(len(self.streams), size=len(positions), p=self.weights)
        x = np.empty((len(positions), seq_len), np.int64)
        y = np.empty_like(x)
        for d in np.unique(which).tolist():
            sel = np.flatnonzero(which == d)
            x[sel], y[sel] = self.streams[d].draw(positions[sel], seq_len, replace(how, salt=(*how.salt, d)))
        return x, y


Stream = TokenStream | SampleStream | MixtureStream


def stream_parts(stream: Stream) -> list[TokenStream | SampleStream]:
    return stream.parts if isinstance(stream, MixtureStream) else [stream]


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x), torch.from_numpy(y)


def _check_batch_args(stream: Stream, seq_len: int, rank: int, world_size: int) -> int:
    if seq_len < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch arguments: seq_len {seq_len}, rank {rank}/{world_size}")
    if stream.seq_len is not None and seq_len != stream.seq_len:
        raise ValueError(f"seq_len {seq_len} differs from the length {stream.seq_len} of the stream's samples")
    for part in stream_parts(stream):
        if part.num_rows(seq_len) < world_size:
            what = "sample(s)" if part.seq_len else f"sequence(s) of {seq_len + 1} tokens"
            raise DataError(
                f"the data holds {part.num_rows(seq_len)} {what}, fewer than the "
                f"{world_size} processes; use more data or a shorter max_sequence_length"
            )
    return stream.num_rows(seq_len)


def get_batch(
    stream: Stream,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    step: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
    section: str = "train_input",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of ``rank``: int64 CPU tensors x, y of shape (B, T).

    A pure function of its arguments, so resuming at ``step`` needs no saved loader state. Row i
    has position ``p = step * B + i`` with ``shuffle`` and ``(step * world_size + rank) * B + i``
    without. Token stream (y is x shifted by one): shuffled, window starts drawn at any token
    offset by ``default_rng([seed, step, rank])`` inside this rank's contiguous part of the
    stream; else window p (wrapping around). Sample stream (y: labels, -100 where the loss mask is
    0): shuffled, rank r walks its contiguous part of the samples in epochs, each epoch a
    permutation from ``default_rng([seed, epoch])``, and takes its p-th sample; else sample p
    (wrapping around). Either way two ranks never share a row's data. Mixture: row i's dataset d
    is drawn by weight from ``default_rng([seed, step, rank])``, then the row is dataset d's row
    at position p under the rules above, with ``d`` appended to each seed (``[seed, step, rank,
    d]``, ``[seed, epoch, d]``). A batch larger than the data repeats rows (wrapping around, or
    drawn again). ``section`` names the params key of the error a batch too large for
    this machine's memory raises (see :func:`~sparsetrain.data.batch_memory.check_batch_fits`), before anything is allocated.
    """
    _check_batch_args(stream, seq_len, rank, world_size)
    check_batch_memory(batch_size, seq_len, section)
    first = step * batch_size if shuffle else (step * world_size + rank) * batch_size
    positions = first + np.arange(batch_size, dtype=np.int64)
    return _tensors(*stream.draw(positions, seq_len, Draw(seed, step, shuffle, rank, world_size)))


def eval_batches(
    stream: Stream,
    batch_size: int,
    seq_len: int,
    num_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    section: str = "eval_input",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive rows (windows or samples) from the start, as batches; rank r takes batches r,
    r + world_size, ... (a mixture: its datasets of positive weight one after another).

    Every rank yields the same number of batches: ``num_batches`` full ones, or, with None or
    more than the data holds, every row: the full batches, then the rows left over as one
    smaller batch (split between the ranks; a rank's share may be empty). A stream with fewer
    rows than a batch per rank yields one smaller batch per rank, its share of the rows (so only
    that many must fit in memory).
    """
    total = _check_batch_args(stream, seq_len, rank, world_size)
    available = total // batch_size // world_size
    if available == 0:  # less than a batch per rank: its share of the rows (only they must fit in memory)
        check_batch_memory(min(batch_size, -(-total // world_size)), seq_len, section)
        yield _tensors(*stream.rows(_rank_share(0, total, rank, world_size), seq_len))
        return
    check_batch_memory(batch_size, seq_len, section)
    count = available if num_batches is None else min(num_batches, available)
    every_row = num_batches is None or num_batches > available
    if num_batches is not None and num_batches > available:
        log.warning("eval: %d batches asked, the data holds %d full ones per process (and the rows left over)",
                    num_batches, count)
    for k in range(count):
        first = (k * world_size + rank) * batch_size
        rows = first + np.arange(batch_size, dtype=np.int64)
        yield _tensors(*stream.rows(rows, seq_len))
    done = available * world_size * batch_size
    if every_row and done < total:  # the tail too: "the whole split" means every row
        yield _tensors(*stream.rows(_rank_share(done, total, rank, world_size), seq_len))


def _rank_share(lo: int, hi: int, rank: int, world_size: int) -> np.ndarray:
    """``rank``'s rows of ``lo..hi-1`` cut into ``world_size`` consecutive parts of ceil((hi - lo) /
    world_size) rows (the last ones shorter or empty), so every row is someone's."""
    per = -(-(hi - lo) // world_size)
    first = min(lo + rank * per, hi)
    return np.arange(first, min(first + per, hi), dtype=np.int64)
