"""Append one measured run to a benchmark's JSON Lines file under ``benchmarks/results/``.

    python benchmarks/record.py RESULT.json --to benchmarks/results/bench_train.jsonl \\
        --label gpt3xl_block75 --command "sparsetrain bench train --preset gpt3-xl ... --json" \\
        [--machine M] [--date YYYY-MM-DD] [--note TEXT] [--lines]

Each line of such a file is one run:

    {"date": ..., "machine": ..., "command": ..., "label": ..., ["note": ...,] "result": ...}

``result`` is the JSON the command produced, unchanged (``--lines``: RESULT is JSON Lines, such as
a run's ``metrics.jsonl``, stored as the list of its records; ``-`` reads stdin). ``date``
defaults to today (UTC); ``machine`` to the result's ``"gpu"`` entry (what the GPU scripts
write), else this host's name. The file is only ever appended to: existing lines are not read
back or rewritten. A RESULT that is not JSON is refused (one line on stderr, exit status 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import sys
from pathlib import Path


class Refused(Exception):
    """A reason to refuse the run, said in one line."""


def read_result(path: str, lines: bool):
    """The JSON in ``path`` (``-``: stdin); with ``lines``, the list of its JSON Lines records."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise Refused(f"cannot read {path}: {e}") from None
    try:
        if lines:
            records = [_loads(line) for line in text.splitlines() if line.strip()]
            if not records:
                raise Refused(f"{path}: no JSON Lines records")
            return records
        return _loads(text)
    except ValueError as e:  # json.JSONDecodeError, or NaN / Infinity
        what = "JSON Lines" if lines else "JSON"
        raise Refused(f"{path} is not {what} ({e})") from None


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _loads(text: str):
    """``json.loads``, refusing NaN and Infinity (Python writes them; JSON has no such values)."""
    return json.loads(text, parse_constant=_not_json)


def default_machine(result) -> str:
    gpu = result.get("gpu") if isinstance(result, dict) else None
    return gpu if isinstance(gpu, str) and gpu else socket.gethostname()


def make_line(result, *, label: str, command: str, machine: str | None = None, date: str | None = None,
              note: str | None = None) -> dict:  # fmt: skip
    if not label.strip():
        raise Refused("--label must not be empty")
    if not command.strip():
        raise Refused("--command must not be empty")
    if date is None:
        date = dt.datetime.now(dt.timezone.utc).date().isoformat()
    else:
        try:
            dt.date.fromisoformat(date)
        except ValueError:
            raise Refused(f"--date {date!r} is not YYYY-MM-DD") from None
    line = {"date": date, "machine": machine or default_machine(result), "command": command, "label": label}
    if note:
        line["note"] = note
    line["result"] = result
    return line


def append(path: Path, line: dict) -> None:
    """Append ``line`` as one JSON line; a file whose last line lacks its newline gets one first."""
    text = json.dumps(line, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", metavar="RESULT", help="the JSON file the command wrote ('-': stdin)")
    ap.add_argument("--to", required=True, type=Path, help="the benchmark's .jsonl file (created if absent)")
    ap.add_argument("--label", required=True, help="a short name for this run")
    ap.add_argument("--command", required=True, help="the exact command that produced RESULT")
    ap.add_argument("--machine", default=None, help="default: the result's 'gpu', else the host name")
    ap.add_argument("--date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    ap.add_argument("--note", default=None, help="anything the figures need to be read right")
    ap.add_argument("--lines", action="store_true", help="RESULT is JSON Lines: stored as a list of records")
    a = ap.parse_args(argv)
    try:
        result = read_result(a.result, a.lines)
        line = make_line(result, label=a.label, command=a.command, machine=a.machine, date=a.date, note=a.note)
        append(a.to, line)
    except Refused as e:
        print(f"record.py: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --to
        print(f"record.py: cannot append to {a.to}: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(f"record.py: appended {a.label!r} ({line['date']}, {line['machine']}) to {a.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
