"""``--set section.key=value`` and ``--unset section.key``: parsed as YAML (a value YAML cannot
read is an error with advice, never the text as it was), applied to the raw params mapping before
the one validation, and remembered so that an error about a key the command line changed names
the flag instead of the params file."""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

import yaml

from sparsetrain.errors import ConfigError


class FlagError(ConfigError):
    """A config error about a command-line flag (``--set``, ``--unset``) rather than the file: its
    message names the flag, and :func:`naming_file` does not prefix the params file."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML). A value YAML cannot read
    is an error, never the text as it was: ``["a\\.b"]`` falling back to a string would reach
    the run as something else (a regex character class instead of a list of patterns)."""
    path, sep, value = text.partition("=")
    keys = path.strip().split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise FlagError(f"--set {text!r}: expected section.key=value, e.g. runconfig.max_steps=100")
    if not value.strip():
        return keys, None
    key = ".".join(keys)
    try:
        parsed = yaml.safe_load(value)
        comment = _dropped_comment(value)
    except RecursionError:
        raise FlagError(f"--set {key}: the value is nested too deeply for YAML") from None
    except Exception as e:  # a YAML error, or a constructor failing on a bad tagged value
        raise FlagError(f"--set {key}: the value is not valid YAML ({_yaml_problem(e)}); {_yaml_advice(key, value)}") from None
    if comment:  # "runs/exp #2" would silently be "runs/exp"
        keep = ("quote the string that holds the # in YAML, e.g. ['a #b']" if value.lstrip().startswith(("[", "{"))
                else _yaml_advice(key, value))
        raise FlagError(f"--set {key}: YAML reads {comment!r} as a comment and drops it; {keep}")
    return keys, parsed


def _dropped_comment(value: str) -> str | None:
    """The trailing part of ``value`` YAML read as a comment (``#`` after a space), or None."""
    tokens = yaml.scan(value, Loader=yaml.SafeLoader)
    ends = [t.end_mark.index for t in tokens if not isinstance(t, (yaml.StreamStartToken, yaml.StreamEndToken))]
    end = max(ends, default=0)
    return value[end:].strip() or None


def _yaml_problem(e: BaseException) -> str:
    """PyYAML's problem in a few words, with the column in the value."""
    problem = getattr(e, "problem", None)
    if not problem:  # a constructor's plain Python error (a date 2001-02-30, "!!int x")
        return one_line(e)
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
    where = f" at column {mark.column + 1}" if mark is not None and not mark.line else ""
    quoted = context if context and "quoted" in context else None  # which kind of string it was in
    return f"{problem}{where}" + (f", {quoted}" if quoted else "")


_DOUBLE_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _yaml_advice(key: str, value: str) -> str:
    """How to write ``value`` so that YAML reads what was meant: double-quoted strings as
    single-quoted ones (where a backslash is a plain character, as a regex needs it), or a scalar
    quoted whole. Shown as the whole flag where a shell passes it in double quotes unchanged."""
    single = _DOUBLE_QUOTED.sub(lambda m: "'" + m.group(1).replace("'", "''") + "'", value)
    fixes = []
    if single != value:
        fixes.append((single, "write strings in single quotes, where a backslash is a plain character (in YAML "
                              "double quotes it starts an escape)"))
    if not value.lstrip().startswith(("[", "{")):  # a list or mapping quoted whole is text, not a fix
        fixes.append(("'" + value.replace("'", "''") + "'", "quote it in YAML to pass it as text"))
    for fixed, why in fixes:
        try:
            yaml.safe_load(fixed)
        except Exception:
            continue
        flag = f"{key}={fixed}"
        return f'{why}: --set "{flag}"' if _double_quotable(flag) else f"{why}: {fixed}"
    return ("write a list as [a, b] and a mapping as {k: v}, with strings that hold backslashes or "
            "YAML's special characters in single quotes, e.g. ['.*attn\\.proj\\.weight']")


def _double_quotable(text: str) -> bool:
    """Whether a POSIX shell passes ``"text"`` through unchanged."""
    return not re.search(r'["$`!]|\\([$`"\\]|$)', text) and text.isprintable()


def apply_unset(raw: dict, paths: typing.Sequence[str]) -> dict:
    """Delete ``--unset section.key`` paths from a raw params mapping (in place) and return it:
    a key removed falls back to its default (or, in a zoo file, to the zoo's default)."""
    for text in paths:
        if "=" in text:
            raise FlagError(f"--unset {text!r}: takes a key without a value (SECTION.KEY); to change a value use --set")
        keys = text.strip().split(".")
        node: Any = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not all(keys) or not isinstance(node, dict) or keys[-1] not in node:
            near = [str(k) for k in node] if isinstance(node, dict) and all(keys) else []
            match = difflib.get_close_matches(keys[-1], near, n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join([*keys[:-1], match[0]])}?" if match else ""
            raise ConfigError(f"--unset {text!r}: no such key in the params file{hint}")
        del node[keys[-1]]
    return raw


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``--set`` overrides to a raw params mapping (in place) and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise FlagError(
                    f"--set {'.'.join(keys)}: {'.'.join(keys[: keys.index(key) + 1])} is a value "
                    f"({type(child).__name__}), not a section with keys"
                )
            node = child
        node[keys[-1]] = value
    return raw


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def flag_keys(overrides: typing.Sequence[str] = (), unset: typing.Sequence[str] = ()) -> dict[str, str]:
    """The keys the command line changed, as written there, and the flag that changed each."""
    keys = {text.strip(): "--unset" for text in unset}
    keys.update({".".join(parse_override(text)[0]): "--set" for text in overrides})
    return keys


def naming_flag(message: str, flags: typing.Mapping[str, str]) -> str | None:
    """``message`` (an error naming a key first) as an error about the flag that set that key, or
    None when no flag did: ``--set runconfig.max_step: unknown key ...``; for a key inside what
    the flag set, both: ``--set sparsity: sparsity.sparsity: ...``."""
    for key in sorted(flags, key=len, reverse=True):
        after = message[len(key) : len(key) + 1]
        if message.startswith(key) and after in (":", " ", ".", "["):
            return f"{flags[key]} {message}" if after in (":", " ") else f"{flags[key]} {key}: {message}"
    for key in flags:  # a section the flag made up: ``--set runconfg.x=1``
        section = key.split(".")[0]
        if message.startswith(f"{section}: unknown section"):
            return f"{flags[key]} {key}: {message}"
    return None
