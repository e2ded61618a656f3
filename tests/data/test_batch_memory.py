"""A batch that cannot fit this machine's memory is one ``ConfigError`` line naming the batch_size
key, raised before any array is allocated; a batch larger than a tiny corpus is allowed (rows
repeat), with a warning."""

from __future__ import annotations

import logging
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sparsetrain import data
from sparsetrain.data import batch_memory as stream_mod
from sparsetrain.errors import ConfigError
from tests.data.helpers import make_input
from tests.helpers import cli

HUGE = 100_000_000_000  # 1e11 sequences: hundreds of TiB at any seq_len


def _stream(n: int) -> data.TokenStream:
    return data.TokenStream([np.arange(n, dtype=np.uint32)])


def _memory(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(stream_mod, "physical_memory", lambda: int(gib * 2**30))


def test_check_batch_fits_names_key_need_and_memory(monkeypatch):
    _memory(monkeypatch, 8)
    with pytest.raises(ConfigError) as e:
        data.check_batch_fits(make_input(batch_size=HUGE, max_sequence_length=1024))
    msg = str(e.value)
    assert msg.startswith("train_input.batch_size: one batch of 100,000,000,000 sequences of 1,024 tokens needs ")
    assert "needs 1.5 PiB (inputs and targets, int64)" in msg  # 1e11 x (2 x 1024 x 8 + 128) bytes
    assert "more than this machine's 8.0 GiB of memory" in msg and "at most 520,223 would fill it" in msg
    assert "\n" not in msg
    data.check_batch_fits(make_input(batch_size=520_223, max_sequence_length=1024))  # fills it: passes
    with pytest.raises(ConfigError, match=r"^train_input\.batch_size: one batch of 520,224 sequences"):
        data.check_batch_fits(make_input(batch_size=520_224, max_sequence_length=1024))


def test_physical_memory_is_the_machines_or_unknown(monkeypatch):
    memory = stream_mod.physical_memory()
    assert memory is None or memory > 2**20

    def unknown(name):
        raise ValueError(name)

    monkeypatch.setattr(stream_mod.os, "sysconf", unknown)
    assert stream_mod.physical_memory() is None
    data.check_batch_fits(make_input(batch_size=HUGE))  # unknown memory: no comparison


def test_huge_batches_fail_fast_without_allocating():
    stream = _stream(5000)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        for shuffle in (True, False):
            with pytest.raises(ConfigError, match=r"^train_input\.batch_size: .* needs [\d,.]+ TiB .* of memory"):
                data.get_batch(stream, HUGE, 32, seed=0, step=0, shuffle=shuffle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and time.perf_counter() - start < 5


def test_batch_bytes_is_what_a_batch_holds():
    stream = _stream(100_000)
    data.get_batch(stream, 256, 128, seed=0, step=0, shuffle=True)  # lazy imports, cached layouts
    tracemalloc.start()
    try:
        x, y = data.get_batch(stream, 256, 128, seed=0, step=1, shuffle=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.nbytes + y.nbytes == 2 * 256 * 128 * 8
    assert peak <= data.batch_bytes(256, 128)  # no stacked copy of the windows besides x and y


def test_eval_checks_the_rows_it_really_reads(monkeypatch):
    _memory(monkeypatch, 2**-14)  # 16 KiB: 90 rows of 10 tokens
    with pytest.raises(ConfigError, match=r"^eval_input\.batch_size: one batch of 1,000 sequences"):
        next(data.eval_batches(_stream(100_001), 1000, 10))
    (small,) = data.eval_batches(_stream(31), HUGE, 10)  # 3 windows: one batch of 3 is read
    assert small[0].shape == (3, 10)
    section = make_input(section="eval_input", batch_size=HUGE, max_sequence_length=10)
    data.check_batch_fits(section)  # no data yet: evaluation's batch is capped by it
    data.check_batch_fits(section, _stream(31))
    with pytest.raises(ConfigError, match=r"^eval_input\.batch_size: one batch of 9,999 sequences"):
        data.check_batch_fits(section, _stream(99_991))


def test_batch_larger_than_tiny_data_warns_and_wraps(corpus: Path, caplog):
    inp = make_input(data_path=str(corpus), split="all", batch_size=10**6, max_sequence_length=16)
    with caplog.at_level(logging.WARNING):
        stream = data.load_tokens(inp)
    rows = stream.num_rows(16)
    assert f"train_input.batch_size: 1,000,000 sequences per batch, more than the {rows:,} the data holds; " \
        "each batch repeats rows" in caplog.text
    x, _ = data.get_batch(stream, rows + 2, 16, seed=0, step=0, shuffle=False)
    assert (x[-2:] == x[:2]).all()  # the documented wrap-around


def test_load_tokens_refuses_a_huge_batch_before_reading(monkeypatch, tmp_path: Path):
    def never(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(data.loading, "encode_corpus", never)
    with pytest.raises(ConfigError, match=r"^train_input\.batch_size: one batch of 100,000,000,000 sequences"):
        data.load_tokens(make_input(data_path=str(tmp_path), batch_size=HUGE))


@pytest.mark.parametrize("section", ["train_input", "eval_input"])
def test_cli_huge_batch_is_one_error_line(section, tiny_params, write_params, tmp_path, capsys, monkeypatch):
    # Eval reads no more rows than its data holds, so there the memory is made small (8 KiB: the
    # train batch of 4 x 32 still fits, not the eval split's 39 sequences).
    _memory(monkeypatch, 4 if section == "train_input" else 2**-17)
    path = write_params(tiny_params(**{section: {"batch_size": HUGE}}))
    assert cli("train", "-p", path, "--model_dir", tmp_path / "m", "--set", "runconfig.max_steps=2") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert f"params.yaml: {section}.batch_size: one batch of " in errors[0]
    assert "more than this machine's" in errors[0]
