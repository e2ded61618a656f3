"""A data section of the params file, end to end: its tokenizer and its token stream.

``train_input`` / ``eval_input`` name a source, a tokenizer and a split; :func:`load_tokenizer`
and :func:`load_tokens` turn them into a :class:`~sparsetrain.data.tokenizers.Tokenizer` and a
stream (text encoded in memory, prompt/completion records as samples in memory, shards
memory-mapped, the zoo's HDF5 files read lazily).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from sparsetrain import distributed
from sparsetrain.data import completions
from sparsetrain.data.batch_memory import check_batch_fits
from sparsetrain.data.checks import check_length
from sparsetrain.data.hdf5 import hdf5_stream
from sparsetrain.data.shards import shard_stream, shard_tokenizer
from sparsetrain.data.sources import DataInput, check_input, iter_documents, split_of
from sparsetrain.data.stream import Stream, TokenStream
from sparsetrain.data.tokenizers import HFTokenizer, Tokenizer, encoded_chunks, make_tokenizer, token_dtype
from sparsetrain.errors import ConfigError

log = logging.getLogger(__name__)


def load_tokenizer(input: DataInput, model_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of a data section.

    ``byte``: UTF-8 bytes. ``bpe``: ``model_dir/tokenizer.json`` if it exists (resume), else a
    byte-level BPE trained on the section's train split (all of it with ``split: all``; with
    ``prompt_field``, its prompts and completions) and saved there; under torchrun rank 0 alone
    does this and the other ranks get a copy of its tokenizer (or its error). Any other value is
    the path of a tokenizer.json. With ``source: shards`` it is the tokenizer recorded in the
    shard directory; ``tokenizer`` must agree with it. With ``source: hdf5`` (token ids, no text)
    it only decodes generated text: ``bpe`` there needs the tokenizer.json already in model_dir.
    """
    check_input(input)
    key = f"{input.section}.tokenizer"
    if input.source == "shards":
        return shard_tokenizer(input)
    if input.source == "hdf5" and input.tokenizer == "bpe":
        saved = Path(model_dir) / "tokenizer.json" if model_dir is not None else None
        if saved is None or not saved.is_file():
            raise ConfigError(
                f"{key}: 'bpe' trains on text, and source hdf5 holds token ids; use byte or the path "
                "of the tokenizer.json the data was encoded with"
            )
        return HFTokenizer.load(saved, key)
    if input.tokenizer == "bpe":
        # One writer of model_dir/tokenizer.json: ranks that each trained one raced on the file.
        return distributed.from_main(lambda: _bpe_tokenizer(input, model_dir, key))
    return make_tokenizer(input.tokenizer, input.bpe_vocab_size, key, None)


def _bpe_tokenizer(input: DataInput, model_dir: Path | None, key: str) -> Tokenizer:
    """``model_dir/tokenizer.json`` if it exists, else a BPE trained on the train split, saved there."""
    if model_dir is not None:
        saved = Path(model_dir) / "tokenizer.json"
        if saved.is_file():
            tok = HFTokenizer.load(saved, key)
            log.info("%s: using the tokenizer saved in %s (%d tokens)", input.section, saved, tok.vocab_size)
            if tok.vocab_size > input.bpe_vocab_size:
                log.warning("%s: %s has more tokens than bpe_vocab_size %d", input.section, saved, input.bpe_vocab_size)
            return tok
    train_split = "all" if split_of(input) == "all" else "train"
    texts = completions.texts(input, train_split) if completions.is_completions(input) else iter_documents(input, train_split)
    tok = make_tokenizer("bpe", input.bpe_vocab_size, key, texts)
    if model_dir is None:
        log.warning("%s: BPE tokenizer trained but not saved (no model_dir)", input.section)
    else:
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        tok.save(Path(model_dir) / "tokenizer.json")
    return tok


def encode_corpus(input: DataInput, tokenizer: Tokenizer, split: str | None = None) -> np.ndarray:
    """All documents of ``split`` encoded and joined with eos between documents."""
    start = time.perf_counter()
    docs = iter_documents(input, split)
    dtype = token_dtype(tokenizer.vocab_size)
    chunks = list(encoded_chunks(tokenizer, docs))
    tokens = np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.empty(0, dtype)
    log.info(
        "%s: %d tokens (%s split, %s tokenizer) in %.1f s",
        input.section,
        len(tokens),
        split or split_of(input),
        tokenizer.spec,
        time.perf_counter() - start,
    )
    return tokens


def load_tokens(input: DataInput, tokenizer: Tokenizer | None = None, model_dir: Path | None = None) -> Stream:
    """The stream of a data section's split.

    Text sources are encoded in memory (``tokenizer`` defaults to ``load_tokenizer(input,
    model_dir)``), prompt/completion records too, as samples of ``max_sequence_length``
    (:mod:`~sparsetrain.data.completions`); shards are memory-mapped read-only; ``hdf5`` files
    are opened read-only (no tokenizer; split and eval_fraction do not apply). Raises ``DataError`` when no window of
    ``max_sequence_length + 1`` tokens fits, or samples of another length. With
    ``max_sequence_length: null`` (hdf5 sample form) the caller takes it from ``stream.seq_len``.
    A batch that cannot fit this machine's memory is refused (a training batch before the data is
    read); a batch larger than the data is allowed, with a warning (see ``check_batch_fits``).
    """
    check_input(input)
    check_batch_fits(input)
    if input.source == "hdf5":
        stream = hdf5_stream(input)
    elif input.source == "shards":
        stream = shard_stream(input)
    elif completions.is_completions(input):
        stream = completions.completion_stream(input, tokenizer or load_tokenizer(input, model_dir))
    else:
        tokenizer = tokenizer or load_tokenizer(input, model_dir)
        tokens = encode_corpus(input, tokenizer)
        stream = TokenStream([tokens], [f"{input.section}:{split_of(input)}"], tokenizer.vocab_size)
    check_length(stream, input.max_sequence_length or stream.seq_len, input.section)
    check_batch_fits(input, stream)
    return stream
