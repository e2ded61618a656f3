"""Corpora, tokenizers, token shards and batches.

A data section of the params file (``train_input`` / ``eval_input``) names a text source, a
tokenizer and a split, or the model zoo's HDF5 files. This package turns it into a stream -- a
:class:`TokenStream` (token ids of the split, in memory, memory-mapped from shards or in HDF5), a
:class:`SampleStream` (fixed-length samples with a loss mask: the zoo's, or prompt/completion
records) or a :class:`MixtureStream` (datasets drawn by weight) -- and draws batches from it. Its
modules, bottom up: ``stream`` (streams and batches), ``hdf5`` (reading the zoo's .h5 files),
``paths`` (relative paths beside the params file), ``sources`` (files, split, documents),
``tokenizers``, ``completions`` (prompt/completion samples), ``shards`` (``sparsetrain prepare``
and reading shards back), ``hdf5_write`` (writing the zoo's layout) and ``loading`` (a data
section end to end).

- sources: ``stdlib`` (the running interpreter's standard library), ``text`` (file, directory or
  glob), ``jsonl`` (one document per line; with ``prompt_field``, one prompt/completion sample
  per line, the loss on the completion only) and ``shards`` (written by :func:`prepare_shards`);
- a relative path missing from the working directory is looked up beside the params file;
- the train/eval split is a stable hash of each file's relative path (blake2b), so it never
  depends on the machine, the process or the order files are listed in;
- batches are a pure function of ``(seed, step, rank)``: there is no loader state to checkpoint and
  a resumed run reads exactly the batches it would have read -- of the same data, which
  :func:`fingerprint` (a few slices, never a full pass) lets a resume check;
- a batch that cannot fit the machine's memory is a one-line error before anything is allocated
  (:func:`check_batch_fits`).
"""

from sparsetrain.data.batch_memory import batch_bytes, check_batch_fits
from sparsetrain.data.checks import check_length, check_vocab
from sparsetrain.data.completions import completion_stream
from sparsetrain.data.fingerprints import fingerprint, fingerprint_changes
from sparsetrain.data.hdf5 import hdf5_stream
from sparsetrain.data.hdf5_write import prepare_zoo_hdf5
from sparsetrain.data.loading import encode_corpus, load_tokenizer, load_tokens
from sparsetrain.data.shards import SHARD_FORMAT, prepare_shards, read_shard_meta
from sparsetrain.data.sources import SOURCES, SPLITS, DataInput, check_input, corpus_files, iter_documents, split_of
from sparsetrain.data.stream import (
    MixtureStream,
    SampleStream,
    Stream,
    TokenStream,
    eval_batches,
    get_batch,
)
from sparsetrain.data.tokenizers import EOS_TOKEN, ByteTokenizer, HFTokenizer, Tokenizer, token_dtype

__all__ = [
    "EOS_TOKEN",
    "SHARD_FORMAT",
    "SOURCES",
    "SPLITS",
    "ByteTokenizer",
    "DataInput",
    "HFTokenizer",
    "MixtureStream",
    "SampleStream",
    "Stream",
    "TokenStream",
    "Tokenizer",
    "batch_bytes",
    "check_batch_fits",
    "check_input",
    "check_length",
    "check_vocab",
    "completion_stream",
    "corpus_files",
    "encode_corpus",
    "eval_batches",
    "fingerprint",
    "fingerprint_changes",
    "get_batch",
    "hdf5_stream",
    "iter_documents",
    "load_tokenizer",
    "load_tokens",
    "prepare_shards",
    "prepare_zoo_hdf5",
    "read_shard_meta",
    "split_of",
    "token_dtype",
]
