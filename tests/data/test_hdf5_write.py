"""``data/hdf5_write.py``: a text source written in the model zoo's HDF5 layout (sample and corpus
form) and read back by ``hdf5_stream`` as exactly the tokens ``load_tokens`` would give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain import data
from sparsetrain.errors import ConfigError, DataError
from tests.data.helpers import make_input

h5py = pytest.importorskip("h5py")


def hinput(out: Path, **overrides):
    values = dict(
        source="hdf5", data_dir=str(out), mixture=None, data_subset=None, shuffle_seed=None, max_sequence_length=None
    )
    values.update(overrides)
    return make_input(**values)


def test_sample_form_round_trip(corpus: Path, tmp_path: Path):
    inp = make_input(data_path=str(corpus), split="all")
    tok = data.ByteTokenizer()
    out = tmp_path / "zoo"
    files = data.prepare_zoo_hdf5(inp, tok, out, seq_len=16, samples_per_file=150)
    tokens = data.encode_corpus(inp, tok)
    windows = (len(tokens) - 1) // 16
    assert len(files) == -(-windows // 150) >= 11  # data_10.h5 must sort after data_9.h5
    assert [f.name for f in files] == [f"data_{i}.h5" for i in range(len(files))]
    assert not list(out.glob(".*"))  # no temp files left
    with h5py.File(files[0], "r") as f:
        assert f["data"].shape == (150, 3, 16) and f["data"].dtype == np.int32
        assert f.attrs["n_examples"] == 150 and '"form": "sample"' in f.attrs["meta"]
        assert (f["data"][:, 1] == 1).all()

    stream = data.hdf5_stream(hinput(out))
    assert stream.seq_len == 16 and stream.num_samples == windows
    ref = data.TokenStream([tokens])
    every = np.arange(windows)
    x, y = stream.rows(every)
    rx, ry = ref.rows(every, 16)
    assert np.array_equal(x, rx) and np.array_equal(y, ry)  # the windows of the same tokens
    assert np.array_equal(np.concatenate([x.reshape(-1), y[-1, -1:]]), tokens[: windows * 16 + 1])
    loaded = data.load_tokens(hinput(out))
    gx, gy = data.get_batch(loaded, 8, 16, seed=0, step=3, shuffle=False)
    wx, wy = data.get_batch(ref, 8, 16, seed=0, step=3, shuffle=False)
    assert torch.equal(gx, wx) and torch.equal(gy, wy)


def test_corpus_form_round_trip_and_rewrite(corpus: Path, tmp_path: Path):
    inp = make_input(data_path=str(corpus), split="eval")
    tok = data.ByteTokenizer()
    out = tmp_path / "zoo"
    files = data.prepare_zoo_hdf5(inp, tok, out, seq_len=32, samples_per_file=20, form="corpus")
    tokens = data.encode_corpus(inp, tok)
    assert len(files) == -(-len(tokens) // 640)
    stream = data.hdf5_stream(hinput(out, max_sequence_length=32))
    assert isinstance(stream, data.TokenStream)
    assert np.array_equal(stream.tokens(), tokens)

    fewer = data.prepare_zoo_hdf5(inp, tok, out, seq_len=32, samples_per_file=10_000, form="corpus")
    assert fewer == [out / "data_0.h5"] and sorted(p.name for p in out.glob("*.h5")) == ["data_0.h5"]
    assert np.array_equal(data.hdf5_stream(hinput(out, max_sequence_length=32)).tokens(), tokens)


def test_bpe_tokenizer_is_saved_beside_the_files(corpus: Path, tmp_path: Path):
    inp = make_input(data_path=str(corpus), split="all", tokenizer="bpe", bpe_vocab_size=300)
    tok = data.load_tokenizer(inp)
    out = tmp_path / "zoo"
    data.prepare_zoo_hdf5(inp, tok, out, seq_len=8, samples_per_file=10_000)
    saved = data.load_tokenizer(hinput(out, tokenizer=str(out / "tokenizer.json")))
    assert saved.vocab_size == tok.vocab_size
    stream = data.hdf5_stream(hinput(out))
    assert 256 < stream.max_token() < tok.vocab_size  # merged tokens were written


def test_prepare_errors(corpus: Path, tmp_path: Path):
    inp = make_input(data_path=str(corpus), split="all")
    tok = data.ByteTokenizer()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "theirs.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"busy: holds other \.h5 files \(theirs\.h5\); use an empty directory$"):
        data.prepare_zoo_hdf5(inp, tok, tmp_path / "busy", seq_len=8)
    with pytest.raises(ConfigError, match=r"^form: 'rows' is not one of sample, corpus$"):
        data.prepare_zoo_hdf5(inp, tok, tmp_path / "z", seq_len=8, form="rows")
    with pytest.raises(ConfigError, match=r"prepare reads a text source, not 'hdf5'"):
        data.prepare_zoo_hdf5(hinput(tmp_path), tok, tmp_path / "z", seq_len=8)
    (tmp_path / "tiny.txt").write_text("short")
    with pytest.raises(DataError, match=r"fewer than seq_len \+ 1 = 65 tokens"):
        data.prepare_zoo_hdf5(
            make_input(data_path=str(tmp_path / "tiny.txt"), split="all"), tok, tmp_path / "z", seq_len=64
        )
