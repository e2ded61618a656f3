"""``data/shards.py``: ``prepare_shards`` gives the same tokens as the text path (byte and BPE, the
tokenizer carried along), uint32 shards for large vocabularies, and bad shard directories named
by file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain import data
from sparsetrain.errors import DataError
from tests.data.helpers import make_input


def test_prepare_shards_matches_text_path(corpus: Path, tmp_path: Path):
    inp = make_input(data_path=str(corpus))
    out = tmp_path / "shards"
    meta = data.prepare_shards(inp, out, "byte", 4096, shard_tokens=5000)
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["format"] == "sparsetrain-shards-v1" and meta["dtype"] == "uint16"
    assert (meta["vocab_size"], meta["eos_id"], meta["tokenizer"]) == (256, 0, "byte")
    assert len(meta["files"]["train"]) > 1 and meta["files"]["train"][0] == "train_000.bin"
    assert not list(out.glob(".*.tmp"))
    for split in ("train", "eval"):
        text_stream = data.load_tokens(make_input(data_path=str(corpus), split=split))
        shard_inp = make_input(source="shards", data_path=str(out), split=split)
        shard_stream = data.load_tokens(shard_inp)
        assert isinstance(shard_stream.arrays[0], np.memmap) and not shard_stream.arrays[0].flags.writeable
        assert np.array_equal(shard_stream.tokens(), text_stream.tokens())
        assert shard_stream.num_tokens == meta["num_tokens"][split]
    assert isinstance(data.load_tokenizer(shard_inp), data.ByteTokenizer)


def test_prepare_bpe_shards_carry_their_tokenizer(corpus: Path, tmp_path: Path):
    out = tmp_path / "shards"
    meta = data.prepare_shards(make_input(data_path=str(corpus)), out, "bpe", 350)
    assert meta["tokenizer"] == "tokenizer.json" and (out / "tokenizer.json").is_file()
    shard_inp = make_input(source="shards", data_path=str(out), tokenizer="bpe", split="eval")
    tok = data.load_tokenizer(shard_inp)
    assert tok.vocab_size == meta["vocab_size"]
    text_stream = data.load_tokens(make_input(data_path=str(corpus), split="eval"), tok)
    assert np.array_equal(data.load_tokens(shard_inp).tokens(), text_stream.tokens())
    same_file = make_input(source="shards", data_path=str(out), tokenizer=str(out / "tokenizer.json"))
    assert data.load_tokenizer(same_file).vocab_size == tok.vocab_size
    with pytest.raises(DataError, match=r"train_input\.tokenizer: 'byte' differs from the shards' tokenizer"):
        data.load_tokenizer(make_input(source="shards", data_path=str(out), tokenizer="byte"))


def write_fake_shards(out: Path, tokens: np.ndarray, vocab_size: int) -> None:
    out.mkdir()
    tokens.tofile(out / "train_000.bin")
    np.array([], dtype=tokens.dtype).tofile(out / "eval_000.bin")
    meta = {
        "format": "sparsetrain-shards-v1",
        "dtype": tokens.dtype.name,
        "vocab_size": vocab_size,
        "eos_id": 0,
        "tokenizer": "byte",
        "num_tokens": {"train": len(tokens), "eval": 0},
        "files": {"train": ["train_000.bin"], "eval": ["eval_000.bin"]},
    }
    (out / "meta.json").write_text(json.dumps(meta))


def test_uint32_shards(tmp_path: Path):
    tokens = np.arange(69_000, 70_000, dtype=np.uint32)
    write_fake_shards(tmp_path / "big", tokens, vocab_size=70_000)
    stream = data.load_tokens(make_input(source="shards", data_path=str(tmp_path / "big")))
    assert stream.dtype == np.uint32 and stream.vocab_size == 70_000
    data.check_vocab(stream, 70_000, "train_input")
    x, y = data.get_batch(stream, 4, 16, seed=0, step=0, shuffle=False)
    assert x[0, 0].item() == 69_000 and y[0, 0].item() == 69_001 and x.dtype == torch.int64
    with pytest.raises(DataError, match="token id 69999 does not fit model.vocab_size 65536"):
        data.check_vocab(stream, 65_536, "train_input")
    assert data.token_dtype(65_536) == np.uint16 and data.token_dtype(65_537) == np.uint32


def test_bad_shard_dir_names_the_file(tmp_path: Path):
    inp = make_input(source="shards", data_path=str(tmp_path))
    with pytest.raises(DataError, match=r"train_input\.data_path: .*meta\.json not found"):
        data.load_tokens(inp)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"train_input\.data_path: .*meta\.json is not readable JSON"):
        data.load_tokens(inp)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "sparsetrain-shards-v1", "dtype": "uint16"}))
    with pytest.raises(DataError, match=r"meta\.json is invalid: missing key 'vocab_size'"):
        data.load_tokenizer(inp)

    write_fake_shards(tmp_path / "cut", np.arange(100, dtype=np.uint16), vocab_size=256)
    with open(tmp_path / "cut" / "train_000.bin", "ab") as f:
        f.write(b"\x01")  # half a token
    with pytest.raises(DataError, match=r"shard .*train_000\.bin has 201 bytes"):
        data.load_tokens(make_input(source="shards", data_path=str(tmp_path / "cut")))
    write_fake_shards(tmp_path / "ok", np.arange(100, dtype=np.uint16), vocab_size=256)
    with pytest.raises(DataError, match=r"eval_input\.max_sequence_length: the data holds 0 tokens"):
        data.load_tokens(
            make_input(source="shards", data_path=str(tmp_path / "ok"), split="eval", section="eval_input")
        )
