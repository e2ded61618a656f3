"""The tokenizer files of an export: the byte tokenizer as a tokenizer.json that AutoTokenizer
loads with ByteTokenizer's ids; a BPE run's tokenizer.json as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from sparsetrain.data.tokenizers import ByteTokenizer, HFTokenizer
from sparsetrain.errors import CheckpointError
from sparsetrain.hf.tokenizer import byte_to_unicode, byte_tokenizer, find_tokenizer, write_tokenizer

TEXTS = [
    "def main():\n\treturn 0  # two  spaces\r\n",
    " leading space, trailing space ",
    "héllo wörld, Ā ā (U+0100 is NUL's byte-level symbol), ÿ",
    "日本語のテキスト 🙂🚀 \U0010fffd",
    "<|endoftext|> is only text to the byte tokenizer",
    "".join(map(chr, range(1, 128))),  # every ASCII character but NUL
    "".join(map(chr, range(0x80, 0x800))),  # every 2-byte lead and every continuation byte
    # every 3- and 4-byte lead (0xD800..0xDFFF are surrogates, no text: 0xD000 stands for lead ED)
    "".join(chr(c if c != 0xD800 else 0xD000) for c in range(0x800, 0x10000, 0x1000)) + "\U00010000\U00040000\U00080000\U000c0000\U00100000",
]


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("byte_tokenizer")
    source = find_tokenizer({"train_input": {"tokenizer": "byte"}}, d)
    write_tokenizer(source, d, model_max_length=4096)
    return d


def test_byte_table_is_the_byte_level_alphabet():
    table = byte_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120" and table[0] == "\u0100"


def test_byte_tokenizer_gives_byte_tokenizer_ids(byte_dir):
    ours, theirs = ByteTokenizer(), transformers.AutoTokenizer.from_pretrained(byte_dir)
    assert (theirs.eos_token_id, theirs.bos_token_id, len(theirs)) == (ours.eos_id, ours.eos_id, ours.vocab_size)
    seen = set()
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text
        assert theirs.decode(ids) == text
        seen |= set(ids)
    # Every byte that UTF-8 text can hold was met (C0, C1, F5..FF never occur in UTF-8).
    assert seen == set(range(1, 256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    # End-of-text: id 0, as ByteTokenizer's NUL; left out of decoded text as there.
    docs = ours.encode_documents(["one", "two"]).tolist()
    assert theirs("one\x00two")["input_ids"] == docs == [*b"one", 0, *b"two"]
    assert theirs.decode(docs, skip_special_tokens=True) == ours.decode(docs) == "onetwo"


def test_byte_tokenizer_is_a_plain_tokenizers_file(byte_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(byte_dir / "tokenizer.json"))
    assert tok.encode("Ā\x00x", add_special_tokens=False).ids == [0xC4, 0x80, 0, ord("x")]
    assert tok.get_vocab_size() == 256 and tok.to_str() == byte_tokenizer().to_str()


def test_bpe_tokenizer_json_is_copied_as_it_is(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    bpe = HFTokenizer.train_bpe(TEXTS * 4, 300)
    bpe.save(run / "tokenizer.json")
    source = find_tokenizer({"train_input": {"tokenizer": "bpe"}}, run)
    assert (source.path, source.eos_token, source.eos_id) == (run / "tokenizer.json", "<|endoftext|>", bpe.eos_id)
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(source, out, model_max_length=64)
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == bpe.eos_id
    for text in TEXTS[:4]:
        ids = theirs(text)["input_ids"]
        assert ids == bpe.encode(text) and theirs.decode(ids, skip_special_tokens=True) == bpe.decode(ids) == text


def test_a_path_tokenizer_and_a_missing_one(tmp_path):
    path = tmp_path / "elsewhere.json"
    HFTokenizer.train_bpe(TEXTS, 280).save(path)
    assert find_tokenizer({"train_input": {"tokenizer": str(path)}}, tmp_path / "run").path == path
    with pytest.raises(CheckpointError, match=r"^train_input\.tokenizer: 'bpe': no tokenizer.json at .*run/tokenizer.json"):
        find_tokenizer({"train_input": {"tokenizer": "bpe"}}, tmp_path / "run")
