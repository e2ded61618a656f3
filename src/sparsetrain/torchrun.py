"""``sparsetrain-torchrun``: torch's own ``torchrun`` (``torch.distributed.run``, same arguments,
same elastic agent), differing only in how a signal to the launcher ends it.

torchrun forwards SIGTERM / SIGINT to the training processes (which finish their step and write
a checkpoint, see ``training.signals``), then raises ``SignalException`` from its own handler:
a traceback and exit 1, which a scheduler reads as a failed job rather than a preempted one.
Here that ends in one line and exit 128 + signal (143 for SIGTERM), as the training processes'
own second-signal exit does. Everything else -- rendezvous, restarts, worker failures and their
error files -- is torchrun's, unchanged.
"""

from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as e:
        sig = int(e.sigval)
        print(f"terminated ({e.sigval.name}): torchrun signalled the training processes, which write a "
              "checkpoint at the end of their step ('interrupted at step N' above); run the same command "
              "again to resume", file=sys.stderr)
        return 128 + sig
    return 0


if __name__ == "__main__":
    sys.exit(main())
