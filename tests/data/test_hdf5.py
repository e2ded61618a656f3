"""``data/hdf5.py`` and the sample / mixture streams of ``data/stream.py``: the model zoo's HDF5
files in both forms read lazily, batches as a pure function of (seed, step, rank) with the loss
mask honoured, epochs, ranks, mixtures, data_subset, and a one-line error for each bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain import data
from sparsetrain.data import stream as stream_mod
from sparsetrain.errors import ConfigError, DataError
from tests.data.helpers import make_input

h5py = pytest.importorskip("h5py")


def write_h5(path: Path, array: np.ndarray, **attrs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=array)
        for name, value in attrs.items():
            f.attrs[name] = value
    return path


def samples(ids, seq_len: int = 4) -> np.ndarray:
    """(n, 3, T): sample s has inputs s * 100 + [0, T), labels one more, mask 0 where (s + j) % 3 == 0."""
    ids = np.asarray(ids)
    x = ids[:, None] * 100 + np.arange(seq_len)
    mask = ((ids[:, None] + np.arange(seq_len)) % 3 != 0).astype(np.int32)
    return np.stack([x, mask, x + 1], axis=1).astype(np.int32)


def expected(ids, seq_len: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    s = samples(ids, seq_len).astype(np.int64)
    return torch.from_numpy(s[:, 0]), torch.from_numpy(np.where(s[:, 1] == 1, s[:, 2], -100))


def ids_of(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // 100).tolist()


def hinput(**overrides):
    values = dict(
        source="hdf5",
        data_dir=None,
        mixture=None,
        data_subset=None,
        shuffle_seed=None,
        max_sequence_length=None,
        split=None,
    )
    values.update(overrides)
    return make_input(**values)


@pytest.fixture
def sample_dir(tmp_path: Path) -> Path:
    """Samples 0..9 in three files whose names sort naturally (data_2 before data_10)."""
    d = tmp_path / "samples"
    write_h5(d / "data_1.h5", samples(range(0, 3)))
    write_h5(d / "data_2.h5", samples(range(3, 7)))
    write_h5(d / "data_10.h5", samples(range(7, 10)))
    (d / "notes.txt").write_text("not read")
    return d


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_sample_batches_are_inputs_and_masked_labels(sample_dir: Path):
    stream = data.hdf5_stream(hinput(data_dir=str(sample_dir)))
    assert isinstance(stream, data.SampleStream)
    assert stream.seq_len == 4 and stream.num_samples == 10 and stream.vocab_size is None
    x, y = data.get_batch(stream, 4, 4, seed=0, step=0, shuffle=False)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 4)
    ex, ey = expected(range(4))
    assert torch.equal(x, ex) and torch.equal(y, ey)
    assert (y == -100).any() and torch.equal(y[y != -100], (x + 1)[y != -100])
    x2, y2 = data.get_batch(stream, 4, 4, seed=0, step=2, shuffle=False)  # samples 8, 9, then wraps
    assert ids_of(x2) == [8, 9, 0, 1] and torch.equal(y2, expected([8, 9, 0, 1])[1])
    r1, _ = data.get_batch(stream, 2, 4, seed=0, step=1, shuffle=False, rank=1, world_size=2)
    assert ids_of(r1) == [6, 7]  # batch step * world_size + rank
    with pytest.raises(ValueError, match="seq_len 8 differs from the length 4"):
        data.get_batch(stream, 2, 8, seed=0, step=0, shuffle=False)


def test_n_examples_limits_the_rows_used(tmp_path: Path):
    write_h5(tmp_path / "old.h5", samples(range(8)), n_examples=5)  # a 1.x GptHDF5DataProcessor file
    stream = data.hdf5_stream(hinput(data_dir=str(tmp_path / "old.h5")))
    assert stream.num_samples == 5
    seen = {i for s in range(10) for i in ids_of(data.get_batch(stream, 3, 4, seed=1, step=s, shuffle=True)[0])}
    assert seen == set(range(5))
    assert [ids_of(x) for x, _ in data.eval_batches(stream, 2, 4)] == [[0, 1], [2, 3], [4]]  # not 5-7


def test_shuffled_epochs_are_permutations_and_batches_pure(sample_dir: Path):
    stream = data.hdf5_stream(hinput(data_dir=str(sample_dir)))
    batch = lambda step, seed=3: data.get_batch(stream, 5, 4, seed=seed, step=step, shuffle=True)
    epoch0 = ids_of(batch(0)[0]) + ids_of(batch(1)[0])
    epoch1 = ids_of(batch(2)[0]) + ids_of(batch(3)[0])
    assert epoch0 == np.random.default_rng([3, 0]).permutation(10).tolist()
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch0
    x, y = batch(1)
    assert all(torch.equal(a, b) for a, b in zip((x, y), batch(1)))
    assert torch.equal(y, expected(ids_of(x))[1])  # the mask goes with its sample
    assert not torch.equal(x, batch(2)[0]) and not torch.equal(x, batch(1, seed=4)[0])
    fresh = data.hdf5_stream(hinput(data_dir=str(sample_dir)))  # no cached state matters
    assert torch.equal(data.get_batch(fresh, 5, 4, seed=3, step=3, shuffle=True)[0], batch(3)[0])


def test_shuffled_ranks_are_disjoint(tmp_path: Path):
    write_h5(tmp_path / "a.h5", samples(range(21)))
    stream = data.hdf5_stream(hinput(data_dir=str(tmp_path)))
    seen = [
        [
            i
            for s in range(12)
            for i in ids_of(data.get_batch(stream, 4, 4, seed=0, step=s, shuffle=True, rank=r, world_size=3)[0])
        ]
        for r in range(3)
    ]
    assert [set(ids) for ids in seen] == [set(range(0, 7)), set(range(7, 14)), set(range(14, 21))]
    assert sorted(seen[1][:7]) == list(range(7, 14))  # each rank's first epoch covers its part once


def test_mixture_draws_by_weight(tmp_path: Path):
    write_h5(tmp_path / "a" / "a.h5", samples(range(0, 50)))
    write_h5(tmp_path / "b" / "b.h5", samples(range(500, 550)))
    mix = lambda wa, wb, **b: [
        {"data_dir": str(tmp_path / "a"), "weight": wa},
        {"data_dir": str(tmp_path / "b"), "weight": wb, **b},
    ]
    never = data.hdf5_stream(hinput(mixture=mix(1.0, 0)))
    assert isinstance(never, data.MixtureStream) and never.seq_len == 4
    rows = [i for s in range(20) for i in ids_of(data.get_batch(never, 8, 4, seed=0, step=s, shuffle=True)[0])]
    assert max(rows) < 50

    stream = data.hdf5_stream(hinput(mixture=mix(3, 1)))
    x, y = data.get_batch(stream, 400, 4, seed=5, step=2, shuffle=True)
    from_b = (x[:, 0] >= 50_000).float().mean().item()
    assert 0.18 < from_b < 0.32
    assert torch.equal(y, expected(ids_of(x))[1])
    again = data.get_batch(stream, 400, 4, seed=5, step=2, shuffle=True)
    assert torch.equal(x, again[0]) and not torch.equal(
        x, data.get_batch(stream, 400, 4, seed=5, step=3, shuffle=True)[0]
    )
    picks = np.random.default_rng([5, 2, 0]).choice(2, size=400, p=[0.75, 0.25])
    assert ((x[:, 0] >= 50_000).numpy() == (picks == 1)).all()
    for rank in (0, 1):  # within a dataset a rank keeps to its part
        xr, _ = data.get_batch(stream, 64, 4, seed=5, step=0, shuffle=True, rank=rank, world_size=2)
        assert all((i % 500) // 25 == rank for i in ids_of(xr))
    evaluated = [i for x, _ in data.eval_batches(stream, 10, 4) for i in ids_of(x)]  # datasets in turn
    assert evaluated == list(range(50)) + list(range(500, 550))
    subset = data.hdf5_stream(hinput(mixture=mix(1, 1, data_subset="0.0-0.1")))
    assert [s.num_samples for s in subset.streams] == [50, 5]


def test_data_subset_selects_fraction_ranges(sample_dir: Path):
    stream = data.hdf5_stream(hinput(data_dir=str(sample_dir), data_subset="0.0-0.3, 0.5-0.7,0.9-1.0"))
    assert stream.num_samples == 6
    ((x, y),) = data.eval_batches(stream, 6, 4)
    assert ids_of(x) == [0, 1, 2, 5, 6, 9] and torch.equal(y, expected([0, 1, 2, 5, 6, 9])[1])
    shuffled = {i for s in range(6) for i in ids_of(data.get_batch(stream, 4, 4, seed=0, step=s, shuffle=True)[0])}
    assert shuffled == {0, 1, 2, 5, 6, 9}
    with pytest.raises(DataError) as exc:
        data.hdf5_stream(hinput(data_dir=str(sample_dir), data_subset="0.0-0.05"))
    assert one_line(exc).startswith("train_input.data_subset: selects none of the 10 samples")


@pytest.mark.parametrize(
    "subset, problem",
    [
        ("0.5-0.2", "'0.5-0.2' does not start before it ends"),
        ("0.0-0.5,0.4-1.0", "'0.4-1.0' overlaps or precedes the range before it"),
        ("0.6-0.8,0.1-0.2", "'0.1-0.2' overlaps or precedes the range before it"),
        ("0.0-1.5", "'0.0-1.5' is not a range 'start-end' of numbers in [0, 1]"),
        ("half", "'half' is not a range"),
        ("0.1-0.2,", "'' is not a range"),
    ],
)
def test_bad_data_subset_is_a_one_line_config_error(sample_dir: Path, subset: str, problem: str):
    with pytest.raises(ConfigError) as exc:
        data.check_input(hinput(data_dir=str(sample_dir), data_subset=subset, section="eval_input"))
    text = one_line(exc)
    assert text.startswith(f"eval_input.data_subset: {subset!r}: {problem}")
    assert text.endswith("e.g. '0.0-0.5,0.7-1.0'")


def test_corpus_form_equals_token_stream_windows(tmp_path: Path):
    tokens = [np.arange(0, 300, dtype=np.uint16), np.arange(1000, 1170, dtype=np.uint16)]
    write_h5(tmp_path / "c" / "part_0.h5", tokens[0])
    write_h5(tmp_path / "c" / "part_1.h5", tokens[1])
    stream = data.hdf5_stream(hinput(data_dir=str(tmp_path / "c"), max_sequence_length=16))
    ref = data.TokenStream(tokens)
    assert isinstance(stream, data.TokenStream) and stream.num_windows(16) == ref.num_windows(16) == 28
    for shuffle in (True, False):
        for step in (0, 3):
            got = data.get_batch(stream, 8, 16, seed=2, step=step, shuffle=shuffle, rank=1, world_size=2)
            want = data.get_batch(ref, 8, 16, seed=2, step=step, shuffle=shuffle, rank=1, world_size=2)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert stream.max_token() == 1169
    data.check_vocab(stream, 1170, "train_input")
    sub = data.hdf5_stream(hinput(data_dir=str(tmp_path / "c"), max_sequence_length=16, data_subset="0.5-1.0"))
    assert sub.num_windows(16) == 14  # windows 14..27: 4 of the first file, all 10 of the second
    ((x, _),) = data.eval_batches(sub, 14, 16)
    assert x[:, 0].tolist() == [224, 240, 256, 272] + list(range(1000, 1160, 16))


def test_files_are_read_a_batch_at_a_time(tmp_path: Path, monkeypatch):
    write_h5(tmp_path / "c.h5", np.arange(5000, dtype=np.int32))
    write_h5(tmp_path / "s" / "s.h5", samples(range(200)))
    reads: list[int] = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):
        out = original(self, key)
        reads.append(np.asarray(out).size)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    monkeypatch.setattr(stream_mod, "_SCAN_CHUNK_TOKENS", 64)
    corpus = data.hdf5_stream(hinput(data_dir=str(tmp_path / "c.h5"), max_sequence_length=32))
    assert isinstance(corpus.arrays[0], h5py.Dataset)  # the dataset itself, not a copy in memory
    data.get_batch(corpus, 4, 32, seed=0, step=0, shuffle=True)
    assert reads and max(reads) <= 33
    reads.clear()
    assert corpus.max_token() == 4999 and max(reads) <= 64 and len(reads) == 5000 // 64 + 1
    sample = data.hdf5_stream(hinput(data_dir=str(tmp_path / "s")))
    reads.clear()
    data.get_batch(sample, 4, 4, seed=0, step=7, shuffle=True)
    assert sum(reads) == 4 * 3 * 4
    reads.clear()
    assert sample.max_token() == 199 * 100 + 4 and max(reads) <= 5 * 3 * 4  # 64 // 12 rows a read


def test_vocab_and_length_checks_of_sample_streams(tmp_path: Path):
    rows = samples(range(3))
    rows[1, 2, 0], rows[1, 1, 0] = 9999, 0  # a label the loss mask leaves out: not checked
    write_h5(tmp_path / "a.h5", rows)
    stream = data.hdf5_stream(hinput(data_dir=str(tmp_path)))
    assert stream.max_token() == 204
    data.check_vocab(stream, 205, "train_input")
    with pytest.raises(DataError, match=r"^train_input: token id 204 does not fit model.vocab_size 200; "):
        data.check_vocab(stream, 200, "train_input")
    rows[0, 0, 1] = -1
    write_h5(tmp_path / "neg" / "a.h5", rows)
    with pytest.raises(DataError, match=r"train_input: token id -1 is negative"):
        data.check_vocab(data.hdf5_stream(hinput(data_dir=str(tmp_path / "neg"))), 1000, "train_input")
    data.check_length(stream, 4, "train_input")
    with pytest.raises(DataError) as exc:
        data.check_length(stream, 8, "eval_input")
    assert one_line(exc) == (
        f"eval_input.max_sequence_length: 8 differs from the length 4 of the samples in {tmp_path / 'a.h5'}; "
        "set it to 4 or null"
    )


def test_load_tokens_and_tokenizer_for_hdf5(sample_dir: Path, tmp_path: Path):
    inp = hinput(data_dir=[str(sample_dir / "data_1.h5"), str(sample_dir / "data_10.h5")], split="eval")
    stream = data.load_tokens(inp)
    assert stream.num_samples == 6 and stream.names[1].endswith("data_10.h5")
    assert isinstance(data.load_tokenizer(inp), data.ByteTokenizer)
    with pytest.raises(ConfigError) as exc:
        data.load_tokenizer(hinput(data_dir=str(sample_dir), tokenizer="bpe"), tmp_path / "run")
    assert one_line(exc).startswith("train_input.tokenizer: 'bpe' trains on text, and source hdf5 holds token ids")
    with pytest.raises(DataError) as exc:
        data.load_tokens(hinput(data_dir=str(sample_dir), max_sequence_length=16))
    assert one_line(exc) == (
        "train_input.max_sequence_length: 16 differs from the length 4 of the samples in "
        f"{sample_dir / 'data_1.h5'}; set it to 4 or null (taken from the data)"
    )


def test_config_keys_of_hdf5_sections(sample_dir: Path):
    cases = [
        (hinput(), "train_input.data_dir: source hdf5 needs data_dir"),
        (hinput(data_dir=str(sample_dir), mixture=[]), "exactly one of them (both given)"),
        (hinput(data_dir=str(sample_dir), data_path="x"), "train_input.data_path: not used with source hdf5"),
        (hinput(data_dir=[]), "train_input.data_dir: [] is not a directory or .h5 file path"),
        (hinput(mixture=[{"data_dir": str(sample_dir)}]), "train_input.mixture[0]: "),
        (hinput(mixture=[{"data_dir": "a", "weight": 1, "wieght": 2}]), "train_input.mixture[0]: unknown key 'wieght'"),
        (hinput(mixture=[{"data_dir": "a", "weight": -1}]), "train_input.mixture[0].weight: -1 is not a number >= 0"),
        (hinput(mixture=[{"data_dir": "a", "weight": 0}]), "train_input.mixture: the weights sum to 0"),
        (
            hinput(mixture=[{"data_dir": "a", "weight": 1}], data_subset="0-1"),
            "train_input.data_subset: not used with mixture",
        ),
        (make_input(data_dir="d"), "train_input.data_dir: only for source hdf5 (source is 'text')"),
        (make_input(source="stdlib", data_subset="0-1"), "train_input.data_subset: only for source hdf5"),
        (
            make_input(source="stdlib", max_sequence_length=None),
            "train_input.max_sequence_length: null only for source hdf5",
        ),
    ]
    for inp, message in cases:
        with pytest.raises(ConfigError) as exc:
            data.check_input(inp)
        assert message in one_line(exc), (message, str(exc.value))
    with pytest.raises(ConfigError, match=r"'hdf5' holds tokens, not documents"):
        next(data.iter_documents(hinput(data_dir=str(sample_dir))))


def test_bad_files_are_one_line_data_errors(tmp_path: Path, monkeypatch):
    def error(inp, kind=DataError) -> str:
        with pytest.raises(kind) as exc:
            data.hdf5_stream(inp)
        return one_line(exc)

    key = "train_input.data_dir"
    missing = tmp_path / "nowhere"
    assert error(hinput(data_dir=str(missing))) == (
        f"{key}: {str(missing)!r} does not exist (give a directory of .h5 files or an .h5 file)"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    assert (
        error(hinput(data_dir=str(tmp_path / "empty")))
        == f"{key}: directory {str(tmp_path / 'empty')!r} holds no .h5 files"
    )
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"this is not HDF5")
    assert error(hinput(data_dir=str(bad))).startswith(f"{key}: {bad} is not a readable HDF5 file (")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("tokens", data=np.arange(4))
    assert error(hinput(data_dir=str(tmp_path / "other.h5"))) == (
        f"{key}: {tmp_path / 'other.h5'} has no dataset 'data' (it holds tokens); the zoo's .h5 files keep tokens there"
    )
    write_h5(tmp_path / "flat.h5", np.zeros((4, 5), np.int32))
    assert error(hinput(data_dir=str(tmp_path / "flat.h5"))) == (
        f"{key}: {tmp_path / 'flat.h5'}: dataset 'data' has shape (4, 5); expected (num_tokens,) (corpus form) "
        "or (num_samples, 3, max_sequence_length) (sample form)"
    )
    write_h5(tmp_path / "float.h5", np.zeros(10, np.float32))
    assert "dataset 'data' holds float32, not integer token ids" in error(hinput(data_dir=str(tmp_path / "float.h5")))
    write_h5(tmp_path / "big_n.h5", samples(range(3)), n_examples=7)
    assert "attribute n_examples 7 is not an integer in [0, 3]" in error(hinput(data_dir=str(tmp_path / "big_n.h5")))

    write_h5(tmp_path / "mixed" / "a.h5", samples(range(3), seq_len=4))
    write_h5(tmp_path / "mixed" / "b.h5", samples(range(3), seq_len=6))
    assert error(hinput(data_dir=str(tmp_path / "mixed"))) == (
        f"{key}: the samples of {tmp_path / 'mixed' / 'b.h5'} have length 6, those of "
        f"{tmp_path / 'mixed' / 'a.h5'} 4; all files of one data section must agree"
    )
    mix = [
        {"data_dir": str(tmp_path / "mixed" / "a.h5"), "weight": 1},
        {"data_dir": str(tmp_path / "flat.h5"), "weight": 1},
    ]
    assert error(hinput(mixture=mix)).startswith("train_input.mixture[1].data_dir: ")
    write_h5(tmp_path / "forms" / "a.h5", samples(range(3)))
    write_h5(tmp_path / "forms" / "b.h5", np.arange(100, dtype=np.int32))
    assert "holds corpus-form data (100,)" in error(hinput(data_dir=str(tmp_path / "forms"), max_sequence_length=4))
    assert error(hinput(data_dir=str(tmp_path / "forms" / "b.h5")), ConfigError) == (
        f"train_input.max_sequence_length: required for corpus-form HDF5 data ({tmp_path / 'forms' / 'b.h5'} "
        "holds a 1-D token array); the sample form (N, 3, msl) carries its own"
    )

    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    assert error(hinput(data_dir=str(tmp_path / "forms"))) == (
        f"{key}: HDF5 data needs h5py, which is not installed; pip install h5py"
    )
