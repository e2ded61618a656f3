"""Experiment trackers beyond metrics.jsonl and TensorBoard: Weights & Biases and MLflow
(``runconfig.loggers``), one small class each with ``log(values, step)`` and ``close()``.

Both work without a network by default, so turning one on never makes a run depend on a server:
wandb runs in offline mode (``WANDB_MODE`` overrides it) with its files in ``model_dir/wandb``;
MLflow writes a file store in ``model_dir/mlruns`` unless ``MLFLOW_TRACKING_URI`` names another.
A resume continues the same tracker run: wandb's run id is the lineage's ``run_id``, and MLflow's
run is found again by its ``sparsetrain.run_id`` tag. The packages are imported only here, only
when asked for (``pip install 'sparsetrain[track]'``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from sparsetrain.errors import UserError

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # logger name -> module it imports


def require(names: list[str]) -> None:
    """Fail in one line, before anything is written, when a listed tracker's package is missing."""
    for name in names:
        module = PACKAGES.get(name)
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"runconfig.loggers: {name} needs the {module} package: "
                            "pip install 'sparsetrain[track]'") from None


def open_tracker(name: str, model_dir: Path, run_id: str | None, run_config: dict | None):
    """The tracker called ``name``; a start that fails (a server out of reach, a bad URI) is one line."""
    cls = {"wandb": WandbTracker, "mlflow": MlflowTracker}[name]
    try:
        return cls(Path(model_dir), tracker_id(run_id), run_config or {})
    except UserError:
        raise
    except Exception as e:  # whatever the package raises: its message, on one line
        raise UserError(f"runconfig.loggers: {name} could not start ({one_line(e)})") from None


def tracker_id(run_id: str | None) -> str | None:
    """The id a tracker run gets: the lineage's ``run_id`` itself where it is a plain word (it is
    12 hex digits when sparsetrain made it), else a digest of it; the same across resumes."""
    if run_id is None or re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        return run_id
    return hashlib.sha256(run_id.encode()).hexdigest()[:16]


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class WandbTracker:
    """A wandb run in ``model_dir/wandb``: offline unless ``WANDB_MODE`` says otherwise
    (``wandb sync model_dir/wandb/offline-run-*`` uploads it later), the project from
    ``WANDB_PROJECT`` or ``sparsetrain``. The console is not captured: train.log keeps it."""

    def __init__(self, model_dir: Path, run_id: str | None, run_config: dict) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "sparsetrain", dir=str(model_dir), id=run_id,
            name=model_dir.resolve().name, resume="allow", config=run_config,
            mode=os.environ.get("WANDB_MODE") or "offline", settings=wandb.Settings(console="off"),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


# MLflow's limits (mlflow.utils.validation): longer values are cut, with "..." at the end.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
BATCH = 100  # params per log_batch call
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")  # what MLflow accepts in metric and param names


def mlflow_key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", name)[:MAX_KEY]


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested params mapping as MLflow params: ``section.key`` -> value text, lists as JSON,
    values longer than MLflow keeps cut short."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 3] + "..."
        out[mlflow_key(name)] = text
    return out


def default_tracking_uri(model_dir: Path) -> str:
    return (Path(model_dir).resolve() / "mlruns").as_uri()


class MlflowTracker:
    """An MLflow run through :class:`mlflow.tracking.MlflowClient` (no global active run, so a
    caller's own MLflow use is left alone). The tracking URI is ``MLFLOW_TRACKING_URI`` or a file
    store in ``model_dir/mlruns``; the experiment ``MLFLOW_EXPERIMENT_NAME`` or ``sparsetrain``.
    MLflow params cannot change once logged: a resume logs only the keys the run lacks."""

    def __init__(self, model_dir: Path, run_id: str | None, run_config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(model_dir)
        if uri.startswith("file:"):
            # MLflow 3 refuses a file store unless asked; without a database package it is the
            # store that works offline, and the one this tracker was asked to default to.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        self.tracking_uri = uri
        experiment = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "sparsetrain")
        found = self._find(experiment, run_id) if run_id else None
        if found is None:
            tags = {"sparsetrain.model_dir": str(Path(model_dir).resolve())}
            if run_id:
                tags["sparsetrain.run_id"] = run_id
            found = self.client.create_run(experiment, tags=tags, run_name=Path(model_dir).resolve().name)
        else:
            self.client.update_run(found.info.run_id, status="RUNNING")
        self.run_id = found.info.run_id
        have = found.data.params
        new = [Param(k, v) for k, v in flat_params(run_config).items() if k not in have]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + BATCH])

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another process made it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _find(self, experiment: str, run_id: str) -> Any:
        runs = self.client.search_runs([experiment], f"tags.`sparsetrain.run_id` = '{run_id}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # NaN and infinities are kept: MLflow stores them
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")
