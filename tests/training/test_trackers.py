"""``runconfig.loggers``: wandb (offline) and MLflow (a file store in model_dir) follow a tiny run
and its resume as the same tracker run, with no network; a bad name and a missing package are one
line each; a tracker that fails mid-run is dropped with a warning and the training finishes."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from sparsetrain.training import trackers
from sparsetrain.training.metrics import tracked_scalars
from tests.e2e.helpers import error_line
from tests.helpers import cli, records

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """wandb and MLflow kept inside tmp_path and off the network, whatever the machine's setup."""
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID",
                 "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)  # the tracker's setdefault of the last is undone too
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))


def train(write_params, tiny_params, model_dir: Path, *sets: str, steps: int = 2) -> int:
    params = write_params(tiny_params(runconfig={"max_steps": steps, "eval_steps": 1}))
    args = [x for s in (f"runconfig.max_steps={steps}", *sets) for x in ("--set", s)]
    return cli("train_and_eval", "--params", params, "--model_dir", model_dir, *args)


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file: wandb's LevelDB-style log (a 7-byte
    header, 32 KiB blocks of CRC, length, type, data chunks), read here as wandb-core writes it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, chunks, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def wandb_history(model_dir: Path) -> tuple[set[str], dict[int, dict]]:
    """Run ids and {step: logged values} over every offline run directory of model_dir."""
    ids, history = set(), {}
    for path in sorted((model_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(items.pop("_step"), {}).update(items)
    return ids, history


def test_wandb_and_mlflow_follow_a_run_and_its_resume(tmp_path, write_params, tiny_params):
    from mlflow.tracking import MlflowClient

    d = tmp_path / "run"
    loggers = "runconfig.loggers=[jsonl,wandb,mlflow]"
    assert train(write_params, tiny_params, d, loggers, steps=2) == 0
    assert train(write_params, tiny_params, d, loggers, steps=4) == 0  # a resume from checkpoint_2
    train_records, evals = records(d), records(d, "eval")
    (run_id,) = {r["run_id"] for r in train_records}
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert not list(d.glob("events.out.tfevents.*")), "tensorboard was not asked for"

    ids, history = wandb_history(d)
    assert len(list((d / "wandb").glob("offline-run-*"))) == 2 and ids == {run_id}  # one run, resumed
    for r in train_records:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"])
        assert history[r["step"]]["train/tokens"] == r["tokens"]
    assert history[4]["eval/loss"] == pytest.approx(evals[-1]["eval_loss"])

    uri = (d / "mlruns").resolve().as_uri()
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "sparsetrain"]
    (run,) = client.search_runs([experiment.experiment_id])  # the resume found the same run
    assert run.data.tags["sparsetrain.run_id"] == run_id and run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in losses] == [(r["step"], pytest.approx(r["loss"])) for r in train_records]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/perplexity")] == [2, 4]
    assert run.data.params["model.hidden_size"] == "32"
    assert run.data.params["runconfig.loggers"] == '["jsonl", "wandb", "mlflow"]'


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(tmp_path, write_params, tiny_params, monkeypatch, capsys):
    calls = []

    def broken(self, values, step):
        calls.append(step)
        raise RuntimeError("server gone\naway")

    monkeypatch.setattr(trackers.MlflowTracker, "log", broken)
    d = tmp_path / "run"
    assert train(write_params, tiny_params, d, "runconfig.loggers=[mlflow,mlflow]") == 0
    assert calls == [1] and [r["step"] for r in records(d)] == [1, 2]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "runconfig.loggers" in line]
    assert warnings == ["runconfig.loggers: mlflow failed at step 1 (server gone away); it logs nothing more in this run"]
    assert not list(d.glob("events.out.tfevents.*"))  # jsonl is written even when not listed


def test_a_bad_logger_name_is_one_line(tmp_path, write_params, tiny_params, capsys):
    assert train(write_params, tiny_params, tmp_path / "run", "runconfig.loggers=[jsonl,wandbb]") == 2
    line = error_line(capsys)
    assert line.endswith("runconfig.loggers: 'wandbb' is not valid; choose any of jsonl, tensorboard, wandb, mlflow")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_package_is_one_line_before_training(tmp_path, write_params, tiny_params, capsys, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    assert train(write_params, tiny_params, tmp_path / "run", f"runconfig.loggers=[jsonl,{name}]") == 2
    assert error_line(capsys) == f"error: runconfig.loggers: {name} needs the {name} package: pip install 'sparsetrain[track]'"
    assert not (tmp_path / "run").exists()  # nothing started: the new model_dir is gone again


def test_duplicates_count_once():
    from sparsetrain.config import params_from_dict

    assert params_from_dict({"runconfig": {"loggers": ["wandb", "jsonl", "wandb"]}}).runconfig.loggers == ["wandb", "jsonl"]


def test_tracked_scalars_are_the_numbers_under_tensorboard_names():
    record = {"kind": "eval", "step": 4, "eval_loss": 2.5, "perplexity": 12.2, "eval_tokens": 64,
              "eval_loss_tokens": "all", "run_id": "abc"}
    assert tracked_scalars(record) == {"eval/loss": 2.5, "eval/perplexity": 12.2, "eval/tokens": 64.0}
    assert tracked_scalars({"kind": "train", "step": 1, "loss": 3.0, "ok": True}) == {"train/loss": 3.0}
    assert tracked_scalars({"kind": "sparsity", "step": 0, "groups": []}) == {}


def test_mlflow_params_are_flat_short_and_named_as_mlflow_allows():
    flat = trackers.flat_params({"sparsity": {"groups": [{"pattern": "x"}], "long": "v" * 7000},
                                 "runconfig": {"max_steps": 4, "model_dir": None, "odd:key": 1}})
    assert flat["sparsity.groups"] == '[{"pattern": "x"}]' and flat["runconfig.max_steps"] == "4"
    assert len(flat["sparsity.long"]) == trackers.MAX_PARAM_VALUE and flat["sparsity.long"].endswith("...")
    assert flat["runconfig.model_dir"] == "null" and flat["runconfig.odd_key"] == "1"
    assert trackers.tracker_id("0123456789ab") == "0123456789ab"
    assert trackers.tracker_id("a/b") == trackers.tracker_id("a/b") and "/" not in trackers.tracker_id("a/b")


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, write_params, tiny_params, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    assert train(write_params, tiny_params, tmp_path / "run", "runconfig.loggers=[mlflow]") == 2
    assert error_line(capsys).startswith("error: runconfig.loggers: mlflow could not start (")
    assert not (tmp_path / "run").exists()
