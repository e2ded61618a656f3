"""Tokenizers: text <-> token ids (``byte``, a locally trained byte-level BPE, or any Hugging Face
``tokenizer.json``), and the encoding of documents into one id array with end-of-text between them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sparsetrain.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens recognised in a tokenizer.json that was not trained here.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
_ENCODE_CHUNK_CHARS = 1 << 23  # documents are encoded in groups of about 8M characters


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary of ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


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
        named = _named_eos(path)
        candidates = (named, *EOS_CANDIDATES) if named is not None else EOS_CANDIDATES
        eos = next((t for t in candidates if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"{key}: {str(path)!r} has no end-of-text token (one of {', '.join(EOS_CANDIDATES)}, "
                            "or the eos_token of a special_tokens_map.json beside it)")
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


def make_tokenizer(spec: str, bpe_vocab_size: int, key: str, train_texts: Iterable[str] | None) -> Tokenizer:
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


def encoded_chunks(tokenizer: Tokenizer, docs: Iterable[str]) -> Iterator[np.ndarray]:
    """Ids of ``docs`` with eos between documents, in pieces (so large corpora stream)."""
    eos = np.array([tokenizer.eos_id], dtype=token_dtype(tokenizer.vocab_size))
    for i, group in enumerate(_document_groups(docs, _ENCODE_CHUNK_CHARS)):
        if i:
            yield eos
        yield tokenizer.encode_documents(group)


def _named_eos(path: Path) -> str | None:
    """The ``eos_token`` a Hugging Face directory names beside its tokenizer.json
    (``special_tokens_map.json``, else ``tokenizer_config.json``): how ``save_pretrained`` records
    a tokenizer whose end-of-text is none of the usual names (our byte tokenizer's NUL)."""
    import json

    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            value = json.loads((Path(path).parent / name).read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            return value
    return None
