"""A cheap fingerprint of a training stream, so that a resume can tell the corpus changed under it.

Batches are a pure function of (seed, step, rank) *and the data*: a resume over other tokens reads
other batches, silently. A checkpoint stores :func:`fingerprint` of its training stream and a resume
compares it with today's (:func:`fingerprint_changes`). Only a few fixed slices are read (9 of
32Ki tokens, evenly spaced: the first, the middle and the last among them), never the whole
corpus: any change of size is seen, an edit between the slices is not. The fingerprint is plain
str/int data, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from sparsetrain.data.stream import MixtureStream, SampleStream, Stream, TokenStream

FORMAT = 1  # fingerprints of another format are not compared
PROBES = 9  # slices read, evenly spaced from the first token to the last (odd: one is the middle)
PROBE_TOKENS = 1 << 15  # tokens per slice (64 KiB of uint16): a count, so the storage dtype does not matter


def _digest() -> Any:
    return hashlib.blake2b(digest_size=16)


def _update(h: Any, *values: Any) -> None:
    """Hash values as little-endian int64, so the digest is of the token ids, not how they are
    stored (uint16 or uint32 shards, big-endian HDF5) or on which machine."""
    for v in values:
        h.update(np.ascontiguousarray(v, dtype="<i8").tobytes())


def _probe_starts(total: int, width: int) -> list[int]:
    """Starts of the ``PROBES`` slices of ``width`` among ``total`` items (fewer when they overlap)."""
    if total <= 0:
        return []
    last = max(0, total - width)
    return sorted({last * i // (PROBES - 1) for i in range(PROBES)})


def _span(stream: TokenStream, ends: np.ndarray, lo: int, hi: int) -> list[np.ndarray]:
    """Tokens ``[lo, hi)`` of the stream's arrays laid end to end (a slice may span arrays)."""
    out = []
    k = int(np.searchsorted(ends, lo, side="right"))
    while lo < hi and k < len(ends):
        first = int(ends[k - 1]) if k else 0
        stop = min(hi, int(ends[k]))
        if stop > lo:
            out.append(np.asarray(stream.arrays[k][lo - first : stop - first]))
            lo = stop
        k += 1
    return out


def _tokens(stream: TokenStream) -> dict[str, Any]:
    lengths = [len(a) for a in stream.arrays]
    total, dtype = sum(lengths), stream.dtype
    h = _digest()
    _update(h, [total, len(lengths)], lengths)  # where arrays end matters: no window crosses one
    ends = np.cumsum(lengths, dtype=np.int64)
    width = PROBE_TOKENS
    for lo in _probe_starts(total, width):
        _update(h, *_span(stream, ends, lo, min(total, lo + width)))
    return {"format": FORMAT, "kind": "tokens", "tokens": int(total), "dtype": dtype.name, "digest": h.hexdigest()}


def _samples(stream: SampleStream) -> dict[str, Any]:
    n, seq_len = stream.num_samples, stream.seq_len
    dtype = np.dtype(stream.arrays[0].dtype)
    h = _digest()
    _update(h, [n, seq_len])
    width = max(1, PROBE_TOKENS // (3 * seq_len))
    for lo in _probe_starts(n, width):
        _update(h, *stream.rows(np.arange(lo, min(n, lo + width), dtype=np.int64)))  # inputs, masked labels
    return {
        "format": FORMAT, "kind": "samples", "tokens": int(n * seq_len), "samples": int(n),
        "seq_len": int(seq_len), "dtype": dtype.name, "digest": h.hexdigest(),
    }


def fingerprint(stream: Stream) -> dict[str, Any]:
    """Size, dtype and a blake2b digest of fixed-position slices of ``stream``'s tokens.

    Keys: ``format``, ``kind`` (tokens, samples or mixture), ``tokens`` (the count), ``dtype``,
    ``digest``; samples add ``samples`` and ``seq_len``, a mixture ``weights`` and ``datasets``
    (the datasets of positive weight, the ones drawn). All values are str or int.
    """
    if isinstance(stream, TokenStream):
        return _tokens(stream)
    if isinstance(stream, SampleStream):
        return _samples(stream)
    if isinstance(stream, MixtureStream):
        drawn = [(s, w) for s, w in zip(stream.streams, stream.weights.tolist()) if w > 0]
        parts = [fingerprint(s) for s, _ in drawn]
        weights = ", ".join(f"{w:.6g}" for _, w in drawn)
        h = _digest()
        h.update(repr(([p["digest"] for p in parts], weights)).encode())
        return {
            "format": FORMAT, "kind": "mixture", "tokens": sum(p["tokens"] for p in parts),
            "dtype": ", ".join(p["dtype"] for p in parts), "datasets": len(parts), "weights": weights,
            "digest": h.hexdigest(),
        }
    raise TypeError(f"not a data stream: {type(stream).__name__}")


_KINDS = {"tokens": "a token corpus", "samples": "HDF5 samples", "mixture": "a mixture"}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """None when ``old`` and ``new`` describe the same tokens, else a short phrase of how they differ.

    Only what changes the batches counts: the same token ids stored in another dtype are the same
    corpus. Fingerprints of another ``format`` are not compared (None).
    """
    if old == new or old.get("format") != new.get("format"):
        return None
    kind = new.get("kind")
    if old.get("kind") != kind:
        return f"the corpus changed: {_KINDS.get(old.get('kind'), old.get('kind'))} then, {_KINDS.get(kind, kind)} now"
    if kind == "samples" and old.get("seq_len") != new.get("seq_len"):
        return f"the corpus changed: samples of {old.get('seq_len')} tokens then, {new.get('seq_len')} now"
    if kind == "samples" and old.get("samples") != new.get("samples"):
        return f"the corpus changed: {old.get('samples', 0):,} samples then, {new.get('samples', 0):,} now"
    if old.get("tokens") != new.get("tokens"):
        return f"the corpus changed: {old.get('tokens', 0):,} tokens then, {new.get('tokens', 0):,} now"
    if kind == "mixture" and old.get("weights") != new.get("weights"):
        return f"the mixture changed: weights {old.get('weights')} then, {new.get('weights')} now"
    if old.get("digest") != new.get("digest"):
        return f"the corpus changed: same size ({new.get('tokens', 0):,} tokens), other tokens"
    return None
