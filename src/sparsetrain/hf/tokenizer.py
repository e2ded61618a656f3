"""A run's tokenizer as Hugging Face ``AutoTokenizer`` files.

The byte tokenizer (:class:`sparsetrain.data.tokenizers.ByteTokenizer`: ids 0..255 are the UTF-8
bytes, id 0 also end-of-text) becomes a ``tokenizer.json`` built with the ``tokenizers`` library:
a BPE without merges over the 256 byte symbols of the byte-level pre-tokenizer (GPT-2's byte to
character table), so every byte is one token whose id is the byte. The NUL byte is the
end-of-text token: it is a special token whose text is the NUL character itself (``"\\x00"``),
matched before pre-tokenization, so text without NUL (all text the byte tokenizer encodes in
practice) gets exactly ``ByteTokenizer.encode``'s ids, a NUL in text is id 0 as there, and
decoding with ``skip_special_tokens=True`` leaves end-of-text out as ``ByteTokenizer.decode``
does. A ``tokenizer.json`` run (``bpe``, or a path) is copied as it is.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsetrain.data.tokenizers import ByteTokenizer, HFTokenizer
from sparsetrain.errors import CheckpointError, UserError

BYTE_EOS = "\x00"  # the byte tokenizer's end-of-text: id 0, the NUL byte


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level table: byte -> the printable character the byte-level pre-tokenizer
    writes for it (printable Latin-1 bytes stand for themselves, the rest are shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def byte_tokenizer() -> Any:
    """A ``tokenizers.Tokenizer`` giving ``ByteTokenizer``'s ids (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = byte_to_unicode()
    if set(table.values()) != set(pre_tokenizers.ByteLevel.alphabet()):  # the library's table is ours
        raise RuntimeError("the tokenizers library's byte-level alphabet differs from GPT-2's byte table")
    vocab = {table[b]: b for b in range(1, 256)}
    vocab[BYTE_EOS] = ByteTokenizer.eos_id  # a NUL in text is split off as this special token first
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS, special=True, normalized=False)])
    return tok


@dataclass(frozen=True)
class TokenizerSource:
    """Where a run's tokenizer comes from: ``byte``, or a ``tokenizer.json`` file to copy."""

    spec: str  # train_input.tokenizer as the run had it
    path: Path | None  # the tokenizer.json, None for byte
    eos_token: str
    eos_id: int
    vocab_size: int


def find_tokenizer(params: dict[str, Any], model_dir: Path) -> TokenizerSource:
    """The tokenizer of a run from its resolved params: ``byte``; else the ``tokenizer.json`` at
    the path in ``train_input.tokenizer``, in ``model_dir`` (a ``bpe`` run saves it there) or in
    a ``source: shards`` directory, the first that exists."""
    train_input = params.get("train_input") if isinstance(params.get("train_input"), dict) else {}
    spec = str(train_input.get("tokenizer", "byte"))
    if spec == "byte":
        tok = ByteTokenizer()
        return TokenizerSource(spec, None, BYTE_EOS, tok.eos_id, tok.vocab_size)
    candidates = [] if spec == "bpe" else [Path(spec).expanduser()]
    candidates.append(Path(model_dir) / "tokenizer.json")
    if train_input.get("source") == "shards" and train_input.get("data_path"):
        candidates.append(Path(str(train_input["data_path"])).expanduser() / "tokenizer.json")
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise CheckpointError(
            f"train_input.tokenizer: {spec!r}: no tokenizer.json at {', '.join(map(str, candidates))}; "
            "the export needs the run's tokenizer"
        )
    try:
        tok = HFTokenizer.load(found, "train_input.tokenizer")
    except UserError as e:
        raise CheckpointError(str(e)) from None
    return TokenizerSource(spec, found, tok.eos_token, tok.eos_id, tok.vocab_size)


def write_tokenizer(source: TokenizerSource, out_dir: Path, model_max_length: int) -> list[str]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in
    ``out_dir``, for ``AutoTokenizer.from_pretrained``; the names written."""
    out_dir = Path(out_dir)
    if source.path is None:
        byte_tokenizer().save(str(out_dir / "tokenizer.json"))
    else:
        shutil.copyfile(source.path, out_dir / "tokenizer.json")
    special = {"bos_token": source.eos_token, "eos_token": source.eos_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode gives the text back, spaces as they were
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
