"""SIGINT / SIGTERM during training: finish the step, write a checkpoint, exit 0."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import torch

from sparsetrain.training.state import Run

log = logging.getLogger("sparsetrain")

class Interrupt:
    """SIGINT / SIGTERM: finish the step, checkpoint, exit 0. A second signal exits at once
    (128 + signal number); the atomic checkpoint writes leave earlier files intact either way."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            # Exit now, from anywhere (an exception raised here can be swallowed inside torch.save);
            # checkpoint writes are atomic, and the next save removes a half-written temp file.
            sys.stderr.write(f"{signal.Signals(signum).name} received again: exiting without a checkpoint\n")
            os._exit(128 + signum)
        self.signum = signum
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank gets it: rank 0 says so
            return
        log.warning("%s received: finishing this step, then writing a checkpoint (send it again to quit now)",
                    signal.Signals(signum).name)

    def requested(self, run: Run, logged: bool) -> bool:
        if not run.dist.active:
            return self.signum is not None
        if not logged:
            return False
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=run.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
