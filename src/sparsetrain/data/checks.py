"""The data against the model, before training: one sequence of ``max_sequence_length`` fits
in every dataset, and every token id fits ``model.vocab_size``. Errors name the section and key."""

from __future__ import annotations

from sparsetrain.data.stream import SampleStream, Stream, TokenStream, stream_parts
from sparsetrain.errors import DataError


def check_length(stream: Stream, max_sequence_length: int, section: str) -> None:
    """Raise ``DataError`` unless ``max_sequence_length`` fits the data and one sequence is there.

    A token stream needs one window of ``max_sequence_length + 1`` tokens (in each dataset of a
    mixture); a sample stream must hold samples of exactly that length, and at least one.
    """
    if stream.seq_len is not None and stream.seq_len != max_sequence_length:
        where = stream_parts(stream)[0].names[0]
        raise DataError(
            f"{section}.max_sequence_length: {max_sequence_length} differs from the length "
            f"{stream.seq_len} of the samples in {where}; set it to {stream.seq_len} or null"
        )
    for part in stream_parts(stream):
        if isinstance(part, SampleStream) and part.num_samples == 0:
            raise DataError(f"{section}: the data ({', '.join(part.names[:3])}) holds no samples")
        if isinstance(part, TokenStream) and part.num_windows(max_sequence_length) == 0:
            longest = max((len(a) for a in part.arrays), default=0)
            raise DataError(
                f"{section}.max_sequence_length: the data holds {part.num_tokens} tokens (longest "
                f"file {longest}), fewer than one sequence of max_sequence_length + 1 = "
                f"{max_sequence_length + 1}; use more data or a shorter sequence"
            )


def check_vocab(stream: Stream, vocab_size: int, section: str) -> None:
    """Raise ``DataError`` if a token id of ``stream`` does not fit a model of ``vocab_size``."""
    top, low = stream.max_token(), stream.min_token()
    if top >= vocab_size:
        tok = f", tokenizer vocab {stream.vocab_size}" if stream.vocab_size else ""
        raise DataError(
            f"{section}: token id {top} does not fit model.vocab_size {vocab_size}{tok}; "
            f"set model.vocab_size to at least {top + 1}"
        )
    if low < 0:
        raise DataError(f"{section}: token id {low} is negative; token ids must lie in [0, model.vocab_size)")
