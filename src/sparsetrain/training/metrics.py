"""Run outputs: ``metrics.jsonl``, TensorBoard events and the log file.

Every logged training step and every evaluation becomes one JSON object on its own line of
``model_dir/metrics.jsonl`` (schema in the README) and the same numbers go to TensorBoard under
``train/*``, ``eval/*`` and ``sparsity/*``. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("sparsetrain")

TB_KEYS = {
    "train": ("loss", "lr", "tokens_per_s", "flops_per_step", "flops_ratio", "mfu"),
    "eval": ("eval_loss", "perplexity"),
}


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard; a no-op when ``enabled`` is false."""

    def __init__(self, model_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(Path(model_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only where used

            self._tb = SummaryWriter(log_dir=str(model_dir))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as e:
            from sparsetrain.errors import UserError

            raise UserError(f"{self._file.name}: cannot write metrics ({e.strerror or e})") from None
        if self._tb is None:
            return
        step = record["step"]
        kind = record.get("kind", "train")
        for key in TB_KEYS.get(kind, ()):
            if isinstance(record.get(key), (int, float)):
                self._tb.add_scalar(f"{kind}/{key.removeprefix('eval_')}", record[key], step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def setup_logging(model_dir: Path | None, verbose: bool = True) -> None:
    """Log INFO to stderr and, given a model_dir, to ``model_dir/train.log``."""
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    log.addHandler(console)
    if model_dir is not None:
        fh = logging.FileHandler(Path(model_dir) / "train.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    log.propagate = False
