"""``data/stream.py``: batches as a pure function of (seed, step, rank) -- shifted, contiguous,
never crossing files or overlapping between ranks -- evaluation batches, and the vocabulary and
length checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain import data
from sparsetrain.errors import DataError
from tests.data.helpers import make_input


def stream_of(*lengths: int, dtype=np.uint32) -> data.TokenStream:
    """Arrays of consecutive ids (array k starts at k * 1_000_000) so a token tells its place."""
    arrays = [np.arange(k * 1_000_000, k * 1_000_000 + n, dtype=dtype) for k, n in enumerate(lengths)]
    return data.TokenStream(arrays)


def test_get_batch_is_deterministic_and_shifted():
    stream = stream_of(5000)
    x, y = data.get_batch(stream, 8, 32, seed=7, step=3, shuffle=True)
    x2, y2 = data.get_batch(stream, 8, 32, seed=7, step=3, shuffle=True)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x - x[:, :1], torch.arange(32).expand(8, 32))  # contiguous windows
    other, _ = data.get_batch(stream, 8, 32, seed=7, step=4, shuffle=True)
    assert not torch.equal(x, other)
    assert int(x.min()) >= 0 and int(y.max()) < 5000


def test_shuffled_ranks_never_overlap():
    stream = stream_of(3000, 2000)
    seq, world = 16, 3
    starts = {
        rank: torch.cat(
            [
                data.get_batch(stream, 8, seq, seed=1, step=s, shuffle=True, rank=rank, world_size=world)[0][:, 0]
                for s in range(30)
            ]
        )
        for rank in range(world)
    }
    covered = [set() for _ in range(world)]
    for rank, firsts in starts.items():
        for start in firsts.tolist():
            covered[rank].update(range(start, start + seq))  # input tokens of the window
    for a in range(world):
        for b in range(a + 1, world):
            assert not covered[a] & covered[b]
    for rank in starts:  # windows stay inside one array
        x, _ = data.get_batch(stream, 8, seq, seed=1, step=0, shuffle=True, rank=rank, world_size=world)
        assert torch.equal(x - x[:, :1], torch.arange(seq).expand(8, seq))


def test_unshuffled_batches_are_consecutive_and_wrap():
    stream = stream_of(101)  # (101 - 1) // 10 = 10 windows
    x0, y0 = data.get_batch(stream, 4, 10, seed=0, step=0, shuffle=False)
    assert x0[:, 0].tolist() == [0, 10, 20, 30] and y0[3, -1].item() == 40
    x1, _ = data.get_batch(stream, 4, 10, seed=0, step=1, shuffle=False)
    assert x1[:, 0].tolist() == [40, 50, 60, 70]
    x2, _ = data.get_batch(stream, 4, 10, seed=0, step=2, shuffle=False)
    assert x2[:, 0].tolist() == [80, 90, 0, 10]  # wraps around
    r0, _ = data.get_batch(stream, 2, 10, seed=0, step=1, shuffle=False, rank=0, world_size=2)
    r1, _ = data.get_batch(stream, 2, 10, seed=0, step=1, shuffle=False, rank=1, world_size=2)
    assert r0[:, 0].tolist() == [40, 50] and r1[:, 0].tolist() == [60, 70]


def test_windows_do_not_cross_files():
    stream = stream_of(25, 5, 31)  # windows of 10 + 1: 2 + 0 + 3
    assert stream.num_windows(10) == 5
    x, y = data.get_batch(stream, 5, 10, seed=0, step=0, shuffle=False)
    assert x[:, 0].tolist() == [0, 10, 2_000_000, 2_000_010, 2_000_020]
    assert torch.equal(y - x, torch.ones_like(x))


def test_eval_batches_counts():
    stream = stream_of(1001)  # 100 windows of 10 + 1
    batches = list(data.eval_batches(stream, 8, 10))
    # the whole split: 12 full batches, then the 4 windows left over (not dropped)
    assert len(batches) == 13 and all(x.shape == (8, 10) for x, _ in batches[:12]) and batches[12][0].shape == (4, 10)
    assert batches[1][0][0, 0].item() == 80 and batches[12][0][:, 0].tolist() == [960, 970, 980, 990]
    assert len(list(data.eval_batches(stream, 8, 10, num_batches=3))) == 3
    assert len(list(data.eval_batches(stream, 8, 10, num_batches=12))) == 12  # a count the data holds: full batches
    more = list(data.eval_batches(stream, 8, 10, num_batches=50))  # more than it holds: every row, as with None
    assert len(more) == 13 and more[12][0].shape == (4, 10)
    again = list(data.eval_batches(stream, 8, 10, num_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    ranks = [list(data.eval_batches(stream, 8, 10, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 7  # 6 full batches each, then 2 of the 4 left over each
    assert ranks[1][0][0][0, 0].item() == 80
    assert ranks[0][6][0][:, 0].tolist() == [960, 970] and ranks[1][6][0][:, 0].tolist() == [980, 990]
    seen = sorted(int(v) for r in ranks for x, _ in r for v in x[:, 0])
    assert seen == list(range(0, 1000, 10))  # every window once over the ranks
    three = [list(data.eval_batches(stream_of(1001 - 50), 8, 10, rank=r, world_size=3)) for r in range(3)]
    assert len({len(r) for r in three}) == 1 and sum(len(x) for r in three for x, _ in r) == 95

    (small,) = data.eval_batches(stream_of(31), 8, 10)  # 3 windows < batch size
    assert small[0].shape == (3, 10)
    for total, world in ((5, 2), (15, 2), (7, 3)):  # less than a batch per rank: still every row once
        shares = [list(data.eval_batches(stream_of(10 * total + 1), 8, 10, rank=r, world_size=world)) for r in range(world)]
        assert all(len(b) == 1 for b in shares)
        assert sorted(int(v) for b in shares for v in b[0][0][:, 0]) == list(range(0, 10 * total, 10))


def test_check_vocab_names_section_and_id():
    stream = data.TokenStream([np.array([1, 2, 300, 5], dtype=np.uint16)], vocab_size=512)
    data.check_vocab(stream, 301, "train_input")
    with pytest.raises(DataError, match="token id 300 does not fit model.vocab_size 300"):
        data.check_vocab(stream, 300, "train_input")
    with pytest.raises(DataError, match=r"eval_input: token id 300 does not fit model.vocab_size 256"):
        data.check_vocab(stream, 256, "eval_input")


def test_too_short_stream_is_an_error(tmp_path: Path):
    (tmp_path / "tiny.txt").write_text("short text")
    inp = make_input(data_path=str(tmp_path / "tiny.txt"), split="all", max_sequence_length=64)
    with pytest.raises(DataError, match=r"train_input\.max_sequence_length: .* 10 tokens .* 65"):
        data.load_tokens(inp)
    data.load_tokens(make_input(data_path=str(tmp_path / "tiny.txt"), split="all", max_sequence_length=9))
