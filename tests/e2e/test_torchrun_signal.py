"""``sparsetrain-torchrun``: SIGTERM to the launcher (a scheduler's preemption) checkpoints every
rank, then ends in one line and exit 143 -- torch's torchrun prints a ``SignalException``
traceback and exits 1 -- and the same command resumes. 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from sparsetrain import checkpoint as ckpt
from tests.helpers import ROOT, records


def test_sigterm_to_the_launcher_checkpoints_and_ends_in_one_line(tmp_path, tiny_params, write_params):
    params = write_params(tiny_params(runconfig={"max_steps": 100_000, "log_steps": 1, "distributed": "ddp"}))
    d = tmp_path / "run"
    cmd = [sys.executable, "-m", "sparsetrain.torchrun", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "run.py"), "--mode", "train", "--params", str(params), "--model_dir", str(d)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    err_path = tmp_path / "err.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while "step 2/" not in err_path.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
            assert proc.poll() is None, err_path.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = err_path.read_text()
    assert rc == 143, text[-3000:]
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith("terminated (SIGTERM): torchrun signalled the training processes")
    assert len(re.findall(r"interrupted at step \d+", text)) == 1  # rank 0 says it, once
    (step, path), = ckpt.list_checkpoints(d)
    assert step >= 2 and ckpt.load_checkpoint(path)["global_step"] == step
    assert [r["step"] for r in records(d, "train")] == list(range(1, step + 1))
