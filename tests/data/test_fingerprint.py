"""``data.fingerprint``: a cheap digest of a training stream (a few fixed slices, never a full pass)
that a checkpoint stores, and ``data.fingerprint_changes``: the phrase a resume over other data
warns with -- for every source kind (embedded corpus, text files, shards, HDF5)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain import data
from sparsetrain.data import fingerprints as fp_mod
from tests.data.helpers import make_input, text_of


class Counting:
    """A 1-D token array that counts the tokens read from it (a stand-in for a huge memory map)."""

    ndim = 1

    def __init__(self, array: np.ndarray):
        self.array, self.dtype, self.read = array, array.dtype, 0

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, key):
        out = self.array[key]
        self.read += np.size(out)
        return out


def changes(a: data.Stream, b: data.Stream) -> str | None:
    return data.fingerprint_changes(data.fingerprint(a), data.fingerprint(b))


def test_same_tokens_equal_one_token_or_appended_tokens_differ():
    tokens = np.random.default_rng(0).integers(0, 50_000, 3_000_000).astype(np.uint16)
    same = data.TokenStream([tokens.copy()])
    assert data.fingerprint(data.TokenStream([tokens])) == data.fingerprint(same)
    assert changes(data.TokenStream([tokens]), same) is None
    for pos in (0, len(tokens) // 2, len(tokens) - 1):  # first, middle, last slice
        edited = tokens.copy()
        edited[pos] += 1
        assert changes(data.TokenStream([tokens]), data.TokenStream([edited])) == (
            "the corpus changed: same size (3,000,000 tokens), other tokens"
        )
    longer = data.TokenStream([np.concatenate([tokens, tokens[:1234]])])
    assert changes(data.TokenStream([tokens]), longer) == "the corpus changed: 3,000,000 tokens then, 3,001,234 now"


def test_is_plain_data_cheap_and_about_token_ids():
    big = Counting(np.arange(20_000_000, dtype=np.uint32) % 60_000)
    fp = data.fingerprint(data.TokenStream([big]))
    assert big.read <= fp_mod.PROBES * fp_mod.PROBE_TOKENS  # 9 slices of 32Ki tokens, not 80 MB
    assert fp["kind"] == "tokens" and fp["tokens"] == 20_000_000 and fp["dtype"] == "uint32"
    assert all(type(k) is str and type(v) in (str, int) for k, v in fp.items())
    buf = io.BytesIO()
    torch.save({"data_fingerprint": fp}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["data_fingerprint"] == fp
    # The same ids stored wider are the same batches: no change reported.
    ids = np.arange(70_000, dtype=np.uint32) % 1000
    assert changes(data.TokenStream([ids]), data.TokenStream([ids.astype(np.uint16)])) is None
    # Where files end matters (no window crosses one), even with the same tokens in order.
    assert changes(data.TokenStream([ids[:100], ids[100:]]), data.TokenStream([ids[:200], ids[200:]])) == (
        "the corpus changed: same size (70,000 tokens), other tokens"
    )


def test_embedded_default_corpus_is_stable():
    inp = make_input(source="stdlib", split="eval", eval_fraction=0.02)
    first, again = data.load_tokens(inp), data.load_tokens(inp)
    assert data.fingerprint(first) == data.fingerprint(again)
    assert data.fingerprint(first)["tokens"] == first.num_tokens > 0


def test_text_files(corpus: Path):
    inp = make_input(data_path=str(corpus), split="all")
    before = data.fingerprint(data.load_tokens(inp))
    assert data.fingerprint(data.load_tokens(inp)) == before
    (corpus / "doc_99.txt").write_text(text_of(99))
    after = data.fingerprint(data.load_tokens(inp))
    assert data.fingerprint_changes(before, after) == (
        f"the corpus changed: {before['tokens']:,} tokens then, {after['tokens']:,} now"
    )


def test_token_shards(corpus: Path, tmp_path: Path):
    out = tmp_path / "shards"
    data.prepare_shards(make_input(data_path=str(corpus)), out, "byte", 4096, shard_tokens=5000)
    inp = make_input(source="shards", data_path=str(out))
    stream = data.load_tokens(inp)
    before = data.fingerprint(stream)
    assert before == data.fingerprint(data.load_tokens(inp)) and before["dtype"] == "uint16"
    first = out / stream.names[0]
    shard = np.memmap(first, dtype=np.uint16, mode="r+")
    shard[3] = (int(shard[3]) + 1) % 256
    shard.flush()
    del shard
    assert data.fingerprint_changes(before, data.fingerprint(data.load_tokens(inp))) == (
        f"the corpus changed: same size ({before['tokens']:,} tokens), other tokens"
    )


def test_hdf5_corpus_samples_and_mixture(tmp_path: Path):
    h5py = pytest.importorskip("h5py")

    def write(path: Path, array: np.ndarray) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("data", data=array)
        return str(path)

    def hinput(**keys):
        values = dict(source="hdf5", data_dir=None, mixture=None, data_subset=None, split=None,
                      max_sequence_length=None)
        return make_input(**{**values, **keys})

    tokens = np.arange(40_000, dtype=np.int32) % 5000
    corpus = hinput(data_dir=write(tmp_path / "c" / "c.h5", tokens), max_sequence_length=16)
    before = data.fingerprint(data.load_tokens(corpus))
    assert before["kind"] == "tokens" and before == data.fingerprint(data.load_tokens(corpus))
    edited = tokens.copy()
    edited[-1] += 1
    write(tmp_path / "c" / "c.h5", edited)
    assert "other tokens" in data.fingerprint_changes(before, data.fingerprint(data.load_tokens(corpus)))

    x = np.arange(300 * 8).reshape(300, 8)
    samples = np.stack([x, np.ones_like(x), x + 1], axis=1).astype(np.int32)
    sample_dir = write(tmp_path / "s" / "s.h5", samples)
    fp = data.fingerprint(data.load_tokens(hinput(data_dir=sample_dir)))
    assert (fp["kind"], fp["samples"], fp["seq_len"], fp["tokens"]) == ("samples", 300, 8, 2400)
    samples[150, 1, 2] = 0  # one loss mask bit in the middle slice: other targets
    write(tmp_path / "s" / "s.h5", samples)
    assert data.fingerprint_changes(fp, data.fingerprint(data.load_tokens(hinput(data_dir=sample_dir)))) == (
        "the corpus changed: same size (2,400 tokens), other tokens"
    )
    subset = data.fingerprint(data.load_tokens(hinput(data_dir=sample_dir, data_subset="0.0-0.5")))
    assert data.fingerprint_changes(fp, subset) == "the corpus changed: 300 samples then, 150 now"

    other = write(tmp_path / "s2" / "s.h5", samples[:100])
    mix = lambda w: hinput(mixture=[{"data_dir": sample_dir, "weight": w}, {"data_dir": other, "weight": 1.0}])
    even = data.fingerprint(data.load_tokens(mix(1.0)))
    assert even["kind"] == "mixture" and even["tokens"] == 3200 and even == data.fingerprint(data.load_tokens(mix(1.0)))
    assert data.fingerprint_changes(even, data.fingerprint(data.load_tokens(mix(3.0)))) == (
        "the mixture changed: weights 0.5, 0.5 then, 0.75, 0.25 now"
    )
    assert data.fingerprint_changes(fp, even) == "the corpus changed: HDF5 samples then, a mixture now"
