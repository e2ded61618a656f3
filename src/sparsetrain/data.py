"""Corpora, tokenizers, token shards and batches.

A data section of the params file (``train_input`` / ``eval_input``) names a text source, a
tokenizer and a split. This module turns it into a :class:`TokenStream` (token ids of the split,
in memory or memory-mapped from shards) and draws batches from it:

- sources: ``stdlib`` (the running interpreter's standard library), ``text`` (file, directory or
  glob), ``jsonl`` (one document per line) and ``shards`` (written by :func:`prepare_shards`);
- the train/eval split is a stable hash of each file's relative path (blake2b), so it never
  depends on the machine, the process or the order files are listed in;
- batches are a pure function of ``(seed, step, rank)``: there is no loader state to checkpoint and
  a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from sparsetrain import distributed
from sparsetrain.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "text", "jsonl", "shards")
SPLITS = ("train", "eval", "all")
SHARD_FORMAT = "sparsetrain-shards-v1"
EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens recognised in a tokenizer.json that was not trained here.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_ENCODE_CHUNK_CHARS = 1 << 23  # documents are encoded in groups of about 8M characters
_SCAN_CHUNK_TOKENS = 1 << 24  # check_vocab reads memory maps in pieces of 16M tokens


class DataInput(Protocol):
    """The fields of a data section that this module reads (see ``params.py``)."""

    source: str
    data_path: str | None
    text_field: str
    tokenizer: str
    bpe_vocab_size: int
    split: str | None
    eval_fraction: float
    batch_size: int
    max_sequence_length: int
    shuffle: bool
    section: str


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary of ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_of(input: DataInput) -> str:
    """The section's split; unset (None) means ``eval`` for eval_input, else ``train``."""
    return input.split or ("eval" if input.section == "eval_input" else "train")


def check_input(input: DataInput) -> None:
    """Raise ``ConfigError`` for a data section whose values cannot work, naming the key."""
    sec = input.section
    if input.source not in SOURCES:
        raise ConfigError(f"{sec}.source: {input.source!r} is not one of {', '.join(SOURCES)}")
    if input.split is not None and input.split not in SPLITS:
        raise ConfigError(f"{sec}.split: {input.split!r} is not one of {', '.join(SPLITS)}")
    if not 0.0 <= input.eval_fraction <= 1.0:
        raise ConfigError(f"{sec}.eval_fraction: {input.eval_fraction} is not in [0, 1]")
    if input.source != "stdlib" and not input.data_path:
        raise ConfigError(
            f"{sec}.data_path: required for source {input.source!r} "
            f"({'a shard directory' if input.source == 'shards' else 'a file, directory or glob'})"
        )


# --------------------------------------------------------------------------------------------
# Corpora: files, stable split, documents
# --------------------------------------------------------------------------------------------


def _hash_unit(key: str) -> float:
    """Stable value in [0, 1) for ``key``: blake2b, never Python's salted ``hash``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2.0**53  # 53 bits: exact in a float, < 1


def _eval_mask(keys: Sequence[str], eval_fraction: float) -> list[bool]:
    """Which keys form the eval split: hash < eval_fraction.

    With two or more keys and ``0 < eval_fraction < 1`` neither split is left empty: if no key falls
    under the fraction, the one with the lowest hash goes to eval (and if all do, the highest
    stays in train). Still a pure function of the key set.
    """
    units = [_hash_unit(k) for k in keys]
    mask = [u < eval_fraction for u in units]
    if 0 < eval_fraction < 1 and len(keys) >= 2:
        if not any(mask):
            mask[int(np.argmin(units))] = True
        if all(mask):
            mask[int(np.argmax(units))] = False
    return mask


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _walk_files(root: Path, keep, section: str | None = None) -> list[Path]:
    """Regular files under ``root``, recursively, that ``keep(name, is_dir)`` accepts (it prunes
    directories too). With ``section``, a directory that cannot be listed is a ``DataError``
    naming ``<section>.data_path`` (else it is skipped)."""

    def unreadable(exc: OSError) -> None:
        if section is not None:
            raise DataError(
                f"{section}.data_path: cannot read directory {str(exc.filename or root)!r}: {exc.strerror or exc}"
            ) from exc

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if keep(d, True)]
        for name in filenames:
            path = Path(dirpath, name)
            if keep(name, False) and path.is_file():
                found.append(path)
    return found


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])

    def keep(name: str, is_dir: bool) -> bool:
        if is_dir:
            return name not in STDLIB_EXCLUDED_DIRS
        return name.endswith(".py") and not name.startswith("test_")

    return root, _walk_files(root, keep)


def _path_files(input: DataInput) -> tuple[Path, list[Path]]:
    """Files named by ``data_path`` (file, directory or glob) and the root keys are relative to."""
    sec, pattern = input.section, str(input.data_path)
    want_jsonl = input.source == "jsonl"

    def keep(name: str, is_dir: bool) -> bool:
        if name.startswith("."):
            return False
        return is_dir or not want_jsonl or name.endswith(".jsonl")

    what = "*.jsonl files" if want_jsonl else "files"
    path = Path(pattern).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = _walk_files(path, keep, sec)
        if not files:
            raise DataError(f"{sec}.data_path: directory {pattern!r} holds no {what}")
        return path, files
    if not _has_magic(pattern):
        if path.exists():  # a FIFO, socket or device: reading it could block forever
            raise DataError(f"{sec}.data_path: {pattern!r} is not a regular file or a directory")
        raise DataError(f"{sec}.data_path: {pattern!r} does not exist (give a file, a directory or a glob)")
    parts = path.parts
    fixed = next((i for i, p in enumerate(parts) if _has_magic(p)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    files = []
    for match in glob.glob(str(path), recursive=True):
        match_path = Path(match)
        if match_path.is_dir():
            files.extend(_walk_files(match_path, keep, sec))
        elif match_path.is_file():
            files.append(match_path)
    if not files:
        raise DataError(f"{sec}.data_path: {pattern!r} matches no {what}")
    return root, files


def _source_files(input: DataInput) -> list[tuple[Path, str]]:
    """(path, key) of every file of the source, sorted by key (the path relative to its root)."""
    if input.source == "stdlib":
        root, files = _stdlib_files()
        if not files:
            raise DataError(f"{input.section}.source: no *.py files found under stdlib {root}")
    else:
        root, files = _path_files(input)
    keyed = {p.relative_to(root).as_posix(): p for p in files}
    return [(keyed[k], k) for k in sorted(keyed)]


def _within_file_split(input: DataInput, files: Sequence[tuple[Path, str]]) -> bool:
    """True when one text/jsonl file is split inside itself rather than by file."""
    return input.source in ("text", "jsonl") and len(files) == 1


def corpus_files(input: DataInput, split: str | None = None) -> list[Path]:
    """The files that hold the documents of ``split`` (default: ``input.split``), sorted.

    A single text or jsonl file is split inside itself, so it is listed for every split.
    Raises ``DataError`` when the split holds no file.
    """
    check_input(input)
    return _split_files(input, split or split_of(input), _source_files(input), allow_empty=False)


def _split_files(input: DataInput, split: str, files: list[tuple[Path, str]], allow_empty: bool) -> list[Path]:
    if split == "all" or _within_file_split(input, files):
        return [p for p, _ in files]
    mask = _eval_mask([k for _, k in files], input.eval_fraction)
    chosen = [p for (p, _), is_eval in zip(files, mask) if is_eval == (split == "eval")]
    if not chosen and not allow_empty:
        raise DataError(
            f"{input.section}.split: the {split} split is empty ({len(files)} file(s), "
            f"eval_fraction {input.eval_fraction}); use more files, another eval_fraction "
            "or split: all"
        )
    return chosen


def _read_text(path: Path, section: str) -> str | None:
    """UTF-8 text of a file (undecodable bytes replaced), or None for a binary file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{section}.data_path: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    if b"\x00" in data:
        log.warning("%s: skipping %s: it holds NUL bytes (binary, not text)", section, path)
        return None
    return data.decode("utf-8", errors="replace")


def _jsonl_documents(path: Path, input: DataInput) -> Iterator[tuple[int, str]]:
    """(index, text) of each document of a JSON Lines file; blank lines are skipped."""
    sec, field = input.section, input.text_field
    text = _read_text(path, sec)
    if text is None:
        return
    index = 0
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid JSON
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{sec}.data_path: {path}:{lineno}: invalid JSON ({exc.msg}); each line must be one JSON object"
            ) from exc
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{sec}.text_field: {field!r} missing in {path}:{lineno} (found: {keys})")
        if not isinstance(record[field], str):
            raise DataError(
                f"{sec}.text_field: {field!r} in {path}:{lineno} is a {type(record[field]).__name__}, not a string"
            )
        yield index, record[field]
        index += 1


def _file_documents(path: Path, input: DataInput) -> Iterator[str]:
    if input.source == "jsonl":
        yield from (doc for _, doc in _jsonl_documents(path, input))
    else:
        text = _read_text(path, input.section)
        if text is not None:
            yield text


def _split_inside_file(path: Path, key: str, input: DataInput, split: str) -> Iterator[str]:
    """Documents of one file's share of ``split``: by position (text) or document hash (jsonl)."""
    frac = input.eval_fraction
    if input.source == "jsonl":
        for index, doc in _jsonl_documents(path, input):
            if split == "all" or (_hash_unit(f"{key}#{index}") < frac) == (split == "eval"):
                yield doc
        return
    text = _read_text(path, input.section) or ""
    cut = len(text) - round(len(text) * frac)
    yield {"all": text, "train": text[:cut], "eval": text[cut:]}[split]


def iter_documents(input: DataInput, split: str | None = None) -> Iterator[str]:
    """Non-empty documents of ``split`` (default: ``input.split``), in file order.

    Raises ``DataError`` for a path matching nothing, an unreadable file, a bad jsonl line, or a
    split or corpus with no text at all.
    """
    return _documents(input, split or split_of(input), allow_empty=False)


def _documents(input: DataInput, split: str, allow_empty: bool) -> Iterator[str]:
    check_input(input)
    if input.source == "shards":
        raise ConfigError(f"{input.section}.source: 'shards' holds tokens, not documents")
    files = _source_files(input)
    if _within_file_split(input, files):
        ((path, key),) = files
        docs = _split_inside_file(path, key, input, split)
    else:
        paths = _split_files(input, split, files, allow_empty)
        docs = (doc for path in paths for doc in _file_documents(path, input))
    count = 0
    for doc in docs:
        if doc:
            count += 1
            yield doc
    if count == 0 and not allow_empty:
        where = "the stdlib" if input.source == "stdlib" else repr(input.data_path)
        raise DataError(
            f"{input.section}.data_path: the {split} split of {where} holds no text "
            f"(empty corpus or split; eval_fraction {input.eval_fraction})"
        )


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


class Tokenizer(ABC):
    """Text <-> token ids. ``spec`` is what a shard directory's meta.json records."""

    spec: str
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the end-of-text token is left out."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the tokenizer to ``path`` (atomically); nothing for tokenizers without state."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Ids of ``texts`` joined with ``eos_id`` between documents, as ``token_dtype``."""
        dtype = token_dtype(self.vocab_size)
        pieces: list[np.ndarray] = []
        eos = np.array([self.eos_id], dtype=dtype)
        for i, ids in enumerate(self.encode_batch(texts)):
            if i:
                pieces.append(eos)
            pieces.append(np.asarray(ids, dtype=dtype))
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes; id 0 (NUL, never in text) is end-of-text."""

    spec = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; eos is left out, an id >= 256 (a padded model vocab) becomes U+FFFD."""
        out = b"".join(bytes((i,)) if i < 256 else "\ufffd".encode() for i in ids if i != self.eos_id)
        return out.decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        pass

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        joined = b"\x00".join(t.encode("utf-8") for t in texts)
        return np.frombuffer(joined, dtype=np.uint8).astype(np.uint16)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (tokenizer.json), e.g. a byte-level BPE."""

    spec = "tokenizer.json"

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN):
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no end-of-text token {eos_token!r}")
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, path: Path, key: str) -> HFTokenizer:
        """Load a tokenizer.json; errors name the params ``key`` (``<section>.tokenizer``)."""
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{key}: {str(path)!r} does not exist; use 'byte', 'bpe' or the path of a Hugging Face tokenizer.json"
            )
        try:
            tok = _HF.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise DataError(f"{key}: {str(path)!r} is not a valid tokenizer.json ({exc})") from exc
        eos = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"{key}: {str(path)!r} has no end-of-text token (one of {', '.join(EOS_CANDIDATES)})")
        return cls(tok, eos)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        """Train a byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as its only special token."""
        from tokenizers import Tokenizer as _HF
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = _HF(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            self.tokenizer.save(str(tmp))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{path}: cannot write ({e.strerror or e})") from None

    def to_json(self) -> dict[str, Any]:
        return json.loads(self.tokenizer.to_str())


def _make_tokenizer(spec: str, bpe_vocab_size: int, key: str, train_texts: Iterable[str] | None) -> Tokenizer:
    """``byte``, a newly trained ``bpe`` (on ``train_texts``), or a tokenizer.json path."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if bpe_vocab_size < 257:
            raise ConfigError(
                f"{key.rsplit('.', 1)[0]}.bpe_vocab_size: {bpe_vocab_size} is too small; use at "
                "least 257 (256 bytes + <|endoftext|>)"
            )
        start = time.perf_counter()
        tok = HFTokenizer.train_bpe(train_texts or [], bpe_vocab_size)
        log.info(
            "trained a byte-level BPE tokenizer: %d tokens in %.1f s",
            tok.vocab_size,
            time.perf_counter() - start,
        )
        return tok
    return HFTokenizer.load(Path(spec).expanduser(), key)


def load_tokenizer(input: DataInput, model_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of a data section.

    ``byte``: UTF-8 bytes. ``bpe``: ``model_dir/tokenizer.json`` if it exists (resume), else a
    byte-level BPE trained on the section's train split (all of it with ``split: all``) and saved
    there; under torchrun rank 0 alone does this and the other ranks get a copy of its tokenizer
    (or its error). Any other value is the path of a tokenizer.json. With ``source: shards`` it is
    the tokenizer recorded in the shard directory; ``tokenizer`` must agree with it.
    """
    check_input(input)
    key = f"{input.section}.tokenizer"
    if input.source == "shards":
        return _shard_tokenizer(input)
    if input.tokenizer == "bpe":
        # One writer of model_dir/tokenizer.json: ranks that each trained one raced on the file.
        return distributed.from_main(lambda: _bpe_tokenizer(input, model_dir, key))
    return _make_tokenizer(input.tokenizer, input.bpe_vocab_size, key, None)


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
    tok = _make_tokenizer("bpe", input.bpe_vocab_size, key, iter_documents(input, train_split))
    if model_dir is None:
        log.warning("%s: BPE tokenizer trained but not saved (no model_dir)", input.section)
    else:
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        tok.save(Path(model_dir) / "tokenizer.json")
    return tok


# --------------------------------------------------------------------------------------------
# Token streams
# --------------------------------------------------------------------------------------------


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


def _document_groups(docs: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """``docs`` in consecutive groups of about ``max_chars`` characters."""
    group: list[str] = []
    size = 0
    for doc in docs:
        group.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def _encoded_chunks(tokenizer: Tokenizer, docs: Iterable[str]) -> Iterator[np.ndarray]:
    """Ids of ``docs`` with eos between documents, in pieces (so large corpora stream)."""
    eos = np.array([tokenizer.eos_id], dtype=token_dtype(tokenizer.vocab_size))
    for i, group in enumerate(_document_groups(docs, _ENCODE_CHUNK_CHARS)):
        if i:
            yield eos
        yield tokenizer.encode_documents(group)


def encode_corpus(input: DataInput, tokenizer: Tokenizer, split: str | None = None) -> np.ndarray:
    """All documents of ``split`` encoded and joined with eos between documents."""
    start = time.perf_counter()
    docs = iter_documents(input, split)
    dtype = token_dtype(tokenizer.vocab_size)
    chunks = list(_encoded_chunks(tokenizer, docs))
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


def load_tokens(input: DataInput, tokenizer: Tokenizer | None = None, model_dir: Path | None = None) -> TokenStream:
    """The token stream of a data section's split.

    Text sources are encoded in memory (``tokenizer`` defaults to ``load_tokenizer(input,
    model_dir)``); shards are memory-mapped read-only. Raises ``DataError`` when no window of
    ``max_sequence_length + 1`` tokens fits.
    """
    check_input(input)
    if input.source == "shards":
        stream = _shard_stream(input)
    else:
        tokenizer = tokenizer or load_tokenizer(input, model_dir)
        tokens = encode_corpus(input, tokenizer)
        stream = TokenStream([tokens], [f"{input.section}:{split_of(input)}"], tokenizer.vocab_size)
    check_length(stream, input.max_sequence_length, input.section)
    return stream


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


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


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
    tokenizer = _make_tokenizer(tokenizer_spec, bpe_vocab_size, key, texts)
    tokenizer.save(out_dir / "tokenizer.json")
    dtype = token_dtype(tokenizer.vocab_size)
    files, counts = {}, {}
    for split in ("train", "eval"):
        writer = _ShardWriter(out_dir, split, dtype, shard_tokens)
        try:
            docs = _documents(input, split, allow_empty=split == "eval")
            for chunk in _encoded_chunks(tokenizer, docs):
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


def _shard_tokenizer(input: DataInput) -> Tokenizer:
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


def _shard_stream(input: DataInput) -> TokenStream:
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
