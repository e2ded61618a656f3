"""``training/metrics.py``: metrics.jsonl and train.log that cannot be opened or written end in one
line, never a traceback per record (issue 17); records carry the run's id; a resume moves the
records of later steps aside without touching other lines."""

from __future__ import annotations

import json
import logging
import os

import pytest

from sparsetrain.errors import UserError
from sparsetrain.training import metrics
from tests.e2e.helpers import error_line
from tests.helpers import cli

FULL = "/dev/full"  # every write fails with ENOSPC (Linux)
needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="needs /dev/full (Linux)")


def test_records_carry_the_run_id(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, loggers=["jsonl"], run_id="abc123")
    writer.write({"kind": "train", "step": 1, "loss": float("nan")})
    writer.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record == {"kind": "train", "step": 1, "loss": None, "run_id": "abc123"}


def test_unopenable_metrics_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match=r"metrics.jsonl: cannot write metrics \(a directory\)"):
        metrics.MetricsWriter(tmp_path, loggers=["jsonl"])


@needs_dev_full
def test_a_full_disk_under_metrics_is_one_line(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, loggers=["jsonl"])
    writer._file.close()
    writer._file = open(FULL, "a", encoding="utf-8")  # the disk fills up mid-run
    with pytest.raises(UserError, match=r"^/dev/full: cannot write metrics \(disk full\)$"):
        writer.write({"kind": "train", "step": 3})
    writer.close()  # no second error at the last flush


def test_an_unopenable_train_log_is_one_line(tmp_path):
    (tmp_path / "train.log").mkdir()
    with pytest.raises(UserError, match=r"train.log: cannot write the log"):
        metrics.setup_logging(tmp_path)


@needs_dev_full
def test_a_train_log_that_fails_is_dropped_with_one_warning(capsys):
    metrics.setup_logging(None)
    log = logging.getLogger("sparsetrain")
    handler = metrics._LogFile(FULL, encoding="utf-8")
    log.addHandler(handler)
    try:
        for i in range(5):
            log.info("step %d", i)
    finally:
        log.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: /dev/full: cannot write the log (disk full); logging to the console only from here"]
    assert err.count("step 4") == 1  # the console goes on
    assert handler not in log.handlers


def test_a_training_whose_metrics_cannot_open_stops_in_one_line(tmp_path, tiny_params, write_params, capsys):
    d = tmp_path / "run"
    (d / "metrics.jsonl").mkdir(parents=True)
    assert cli("train", "--params", write_params(tiny_params()), "--model_dir", d) == 2
    assert error_line(capsys).startswith(f"error: {d / 'metrics.jsonl'}: cannot write metrics")


def test_move_records_after_moves_later_steps_and_keeps_the_rest(tmp_path):
    path, dest = tmp_path / "metrics.jsonl", tmp_path / "abandoned" / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join([lines[0], "not json", lines[1], lines[2], json.dumps({"step": "x"}), lines[3]]) + "\n")
    path.chmod(0o640)
    assert metrics.move_records_after(path, 2, dest) == 2
    assert path.read_text().splitlines() == [lines[0], "not json", lines[1], json.dumps({"step": "x"})]
    assert dest.read_text().splitlines() == [lines[2], lines[3]]
    assert path.stat().st_mode & 0o777 == 0o640
    assert metrics.move_records_after(path, 2, dest) == 0  # nothing later: nothing moves
    assert metrics.move_records_after(tmp_path / "missing.jsonl", 0, dest) == 0


def test_move_records_after_keeps_lines_that_are_not_utf8_byte_for_byte(tmp_path):
    """A foreign or torn line of invalid UTF-8 stays where it was, unchanged, and the records
    around it move as usual: a resume never stops on it."""
    path, dest = tmp_path / "metrics.jsonl", tmp_path / "abandoned" / "metrics.jsonl"
    junk = b"\xff\xfe not text\n"
    path.write_bytes(b'{"step": 1}\n' + junk + b'{"step": 3}\n')
    assert metrics.move_records_after(path, 2, dest) == 1
    assert path.read_bytes() == b'{"step": 1}\n' + junk
    assert dest.read_bytes() == b'{"step": 3}\n'
