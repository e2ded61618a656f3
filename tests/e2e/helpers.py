"""Helpers of the end-to-end suites: the temporary file of a checkpoint save, and the one ``error:``
line of a failed run."""

from __future__ import annotations

import re

TEMP_RE = re.compile(r"^\.checkpoint_(\d+)\.mdl\..*\.tmp$")


def error_line(capsys, *, only: bool = False) -> str:
    """The single ``error:`` line of a failed run (log lines may precede it, unless ``only``)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if only:
        assert lines == errors, err
    return errors[0]
