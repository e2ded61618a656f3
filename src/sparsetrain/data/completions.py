"""Fine-tuning data: JSON Lines of prompt/completion records, one fixed-length sample each, with
the loss on the completion's tokens only (the SPDF paper's E2E, WebNLG, DART, Curation Corpus).

``source: jsonl`` with ``prompt_field`` set: each non-blank line is one JSON object whose
``prompt_field`` and ``completion_field`` hold strings. A record becomes one sample of
``max_sequence_length + 1`` tokens::

    tokens(prompt) + tokens(completion) + [end-of-text]      then padding

Prompt and completion are encoded separately and joined, so their boundary is a token boundary
(put any separator in the data: the example's prompts end with " ->"). The end-of-text token
(byte tokenizer: 0; a tokenizer.json's eos) closes the completion and is counted, so the model
learns where to stop. Inputs are the sample without its last token, targets without its first;
a target is counted (the loss mask) when it is a completion token or the end-of-text, so the
loss is the mean over the completion's tokens. Targets of prompt positions and padding are -100;
padding inputs are the end-of-text id. An empty prompt is allowed (the completion's first token
then has nothing before it and is not counted).

Too long for ``max_sequence_length + 1`` tokens: the completion is kept whole and the prompt is
cut at its start (its end, next to the completion, stays); a completion too long even beside
the prompt's last token keeps that one prompt token and is cut at its end (its end-of-text goes
too). The number of records cut is logged once per section.

The samples are a :class:`~sparsetrain.data.stream.SampleStream`, the zoo's sample form (input
ids, loss mask, labels), so batches, shuffling (epochs of permutations), evaluation and the
resume fingerprint are those of the zoo's HDF5 samples. The split is the jsonl rule of
:mod:`~sparsetrain.data.sources`: one file by record (the hash of its position), several files
by file. A record without the field, with a field that is not a string, or with an empty
completion, and a line that is not JSON, are each a one-line ``DataError`` naming the file,
the line and the key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sparsetrain.data.sources import DataInput, check_input, jsonl_records, record_field, split_items, split_of
from sparsetrain.data.stream import SampleStream
from sparsetrain.data.tokenizers import Tokenizer, token_dtype
from sparsetrain.errors import DataError

log = logging.getLogger(__name__)

_ENCODE_RECORDS = 4096  # records encoded per tokenizer call


class Record(NamedTuple):
    """One prompt/completion record and where it was read (``file:line``, for errors)."""

    prompt: str
    completion: str
    where: str


def is_completions(input: DataInput) -> bool:
    """True for a section whose records are prompt/completion samples (jsonl with prompt_field)."""
    return input.source == "jsonl" and getattr(input, "prompt_field", None) is not None


def _file_records(path: Path, input: DataInput) -> Iterator[tuple[int, Record]]:
    """(index, record) of each record of one file; a bad record is a DataError."""
    sec = input.section
    for index, lineno, record in jsonl_records(path, sec):
        where = f"{path}:{lineno}"
        prompt = record_field(record, input.prompt_field, f"{sec}.prompt_field", where)
        completion = record_field(record, input.completion_field, f"{sec}.completion_field", where)
        if not completion:
            raise DataError(
                f"{sec}.completion_field: {input.completion_field!r} in {where} is empty; a sample needs a "
                "completion to learn (drop the record)"
            )
        yield index, Record(prompt, completion, where)


def records(input: DataInput, split: str | None = None) -> Iterator[Record]:
    """The records of ``split`` (default: ``input.split``), in file order."""
    check_input(input)
    return split_items(input, split or split_of(input), lambda path: _file_records(path, input))


def texts(input: DataInput, split: str) -> Iterator[str]:
    """The prompts and completions of ``split``, one text each: what a local BPE trains on."""
    for prompt, completion, _ in records(input, split):
        if prompt:
            yield prompt
        yield completion


def fit_sample(prompt: Sequence[int], completion: Sequence[int], budget: int) -> tuple[list[int], list[int], str | None]:
    """(prompt, completion) ids cut to ``budget`` tokens in all, and what was cut (None, "prompt"
    or "completion"). ``completion`` includes its end-of-text. The completion is kept whole and
    the prompt keeps its end; a completion that alone fills the budget keeps the prompt's last
    token (so each kept completion token is predicted) and loses its tail."""
    prompt, completion = list(prompt), list(completion)
    if len(prompt) + len(completion) <= budget:
        return prompt, completion, None
    room = budget - len(completion)
    if room >= 1:
        return prompt[len(prompt) - room :], completion, "prompt"
    keep = prompt[-1:]
    return keep, completion[: budget - len(keep)], "completion"


def sample_rows(prompt: Sequence[int], completion: Sequence[int], seq_len: int, pad_id: int) -> np.ndarray:
    """One sample in the zoo's form, int64 (3, seq_len): input ids, loss mask, labels. The ids
    ``prompt + completion`` (at most ``seq_len + 1``) give inputs ``[:-1]`` and labels ``[1:]``;
    a label is counted (mask 1) where it is a completion token; the rest is padding (``pad_id``,
    mask 0)."""
    ids = [*prompt, *completion]
    assert 2 <= len(ids) <= seq_len + 1, "fit_sample cuts a sample to seq_len + 1 tokens"
    out = np.zeros((3, seq_len), np.int64)
    n = len(ids) - 1
    out[0] = out[2] = pad_id
    out[0, :n] = ids[:-1]
    out[2, :n] = ids[1:]
    first = max(len(prompt) - 1, 0)  # label i is ids[i + 1]: a completion token from i = len(prompt) - 1
    out[1, first:n] = 1
    return out


def _batches(items: Iterator[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def completion_stream(input: DataInput, tokenizer: Tokenizer) -> SampleStream:
    """The samples of the section's split (see the module docstring), in memory, as a
    :class:`SampleStream` of ``max_sequence_length`` tokens; a split with no record is a DataError."""
    split, sec = split_of(input), input.section
    seq_len = int(input.max_sequence_length)
    eos, dtype = tokenizer.eos_id, token_dtype(tokenizer.vocab_size)
    blocks: list[np.ndarray] = []
    cuts = {"prompt": 0, "completion": 0}
    for batch in _batches(records(input, split), _ENCODE_RECORDS):
        prompts = tokenizer.encode_batch([r.prompt for r in batch])
        completions = tokenizer.encode_batch([r.completion for r in batch])
        block = np.empty((len(batch), 3, seq_len), dtype)
        for i, (record, p_ids, c_ids) in enumerate(zip(batch, prompts, completions)):
            if not p_ids and not c_ids:
                raise DataError(f"{sec}.completion_field: {record.where}: the prompt is empty and the completion "
                                f"{record.completion[:40]!r} encodes to no tokens; drop the record")
            p_ids, c_ids, cut = fit_sample(p_ids, [*c_ids, eos], seq_len + 1)
            if cut:
                cuts[cut] += 1
            block[i] = sample_rows(p_ids, c_ids, seq_len, eos)
        blocks.append(block)
    if not blocks:
        raise DataError(
            f"{sec}.data_path: the {split} split of {input.data_path!r} holds no records (eval_fraction "
            f"{input.eval_fraction}); use more records, another eval_fraction or split: all"
        )
    samples = np.concatenate(blocks)
    if cuts["prompt"] or cuts["completion"]:
        log.warning(
            "%s: %d of %d records are longer than max_sequence_length + 1 = %d tokens: %d cut at the prompt's "
            "start, %d at the completion's end", sec, cuts["prompt"] + cuts["completion"],
            len(samples), seq_len + 1, cuts["prompt"], cuts["completion"],
        )
    log.info("%s: %d prompt/completion samples of %d tokens (%s split, %s tokenizer), %d completion tokens",
             sec, len(samples), seq_len, split, tokenizer.spec, int(samples[:, 1].sum(dtype=np.int64)))
    stream = SampleStream([samples], [f"{sec}:{split}"])
    stream.vocab_size = tokenizer.vocab_size
    return stream
