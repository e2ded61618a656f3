"""Schedules of dynamic sparsity (the zoo's 2.x): when masks change (:class:`UpdateRule`) and how a
hyperparameter (the sparsity level, RigL/SET's drop fraction) moves with the step
(:class:`HyperSchedule`). Parsed once from the ``sparsity:`` block; evaluating one is a pure
function of the step, so a resumed run sees the same values.

Semantics (the zoo's ``cerebras.pytorch.sparse.utils``, t = the optimizer steps done):

- ``update: {freq, start=0, stop=None}``: t is an update step when t >= start, t < stop (if
  given) and (t - start) % freq == 0; ``update: {steps: [...]}``: exactly those steps; no
  ``update``: every step.
- a number: constant; ``{type: constant, value}``; ``{type: linear, init, slope}``: init + slope t;
  ``{type: exp, init, gamma, final=1}``: final - (final - init) e^(gamma t); ``{type: power, init,
  beta}``: init beta^t; ``{type: cosine, init, half_period, minimum=0}``: o + a cos(pi t /
  half_period) with o = (init + minimum) / 2, a = init - o; ``{type: cycling, values}`` or a plain
  list: values[j mod n] at the j-th update step (0-based), values[0] before the first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sparsetrain.config.fields import closest, key_text, number
from sparsetrain.errors import ConfigError

# type -> (required keys, optional keys with defaults)
HYPER_KINDS: dict[str, tuple[tuple[str, ...], dict[str, float]]] = {
    "constant": (("value",), {}),
    "linear": (("init", "slope"), {}),
    "exp": (("init", "gamma"), {"final": 1.0}),
    "power": (("init", "beta"), {}),
    "cosine": (("init", "half_period"), {"minimum": 0.0}),
    "cycling": (("values",), {}),
}


@dataclass(frozen=True)
class HyperSchedule:
    """A hyperparameter as a function of the step: ``kind`` in :data:`HYPER_KINDS`, its numbers in
    ``args`` (``values`` a tuple for cycling)."""

    kind: str
    args: tuple[tuple[str, Any], ...]

    def value(self, step: int, updates_before: int = 0) -> float:
        """The value after ``step`` optimizer steps; ``updates_before``: update steps before this
        one (cycling moves on one value per update step)."""
        a = dict(self.args)
        if self.kind == "constant":
            return a["value"]
        if self.kind == "linear":
            return a["init"] + a["slope"] * step
        if self.kind == "exp":
            scale = a["final"] - a["init"]
            return a["final"] if scale == 0 else a["final"] - scale * _exp(a["gamma"] * step)
        if self.kind == "power":
            return 0.0 if a["init"] == 0 else a["init"] * _pow(a["beta"], step)
        if self.kind == "cosine":
            offset = (a["init"] + a["minimum"]) / 2
            return offset + (a["init"] - offset) * math.cos(math.pi * step / a["half_period"])
        values = a["values"]
        return values[updates_before % len(values)]

    def to_value(self) -> Any:
        """As a params file writes it: a number (constant), a list (cycling) or ``{type, ...}``."""
        a = dict(self.args)
        if self.kind == "constant":
            return a["value"]
        if self.kind == "cycling":
            return list(a["values"])
        return {"type": self.kind, **a}

    def describe(self) -> str:
        """Short text for logs and ``plan``: ``0.75``, ``cosine(init=0.3, half_period=3584)``."""
        if self.kind == "constant":
            return f"{dict(self.args)['value']:g}"
        if self.kind == "cycling":
            return "cycling " + "/".join(f"{v:g}" for v in dict(self.args)["values"])
        return f"{self.kind}(" + ", ".join(f"{k}={v:g}" for k, v in self.args) + ")"


@dataclass(frozen=True)
class UpdateRule:
    """Which steps change the masks: every ``freq``-th step from ``start`` up to (not including)
    ``stop``, or exactly ``steps``."""

    freq: int = 1
    start: int = 0
    stop: int | None = None
    steps: tuple[int, ...] | None = None

    def is_update(self, step: int) -> bool:
        if self.steps is not None:
            return step in self.steps
        if step < self.start or (self.stop is not None and step >= self.stop):
            return False
        return (step - self.start) % self.freq == 0

    def to_value(self) -> dict[str, Any] | None:
        """As a params file writes it (None: every step)."""
        if self.steps is not None:
            return {"steps": list(self.steps)}
        if (self.freq, self.start, self.stop) == (1, 0, None):
            return None
        out: dict[str, Any] = {"freq": self.freq}
        if self.start:
            out["start"] = self.start
        if self.stop is not None:
            out["stop"] = self.stop
        return out

    def describe(self) -> str:
        if self.steps is not None:
            return "at steps " + ", ".join(map(str, self.steps[:8])) + (", ..." if len(self.steps) > 8 else "")
        text = "every step" if self.freq == 1 else f"every {self.freq} steps"
        if self.start:
            text += f" from step {self.start}"
        if self.stop is not None:
            text += f" before step {self.stop}"
        return text

    def steps_until(self, last: int) -> list[int]:
        """The update steps in 1..last (masks change after an optimizer step, never at step 0)."""
        if self.steps is not None:
            return sorted(s for s in set(self.steps) if 0 < s <= last)
        first = max(self.start, 1)
        first += (self.start - first) % self.freq
        end = last if self.stop is None else min(last, self.stop - 1)
        return list(range(first, end + 1, self.freq))

    def updates_before(self, step: int) -> int:
        """How many update steps come before ``step`` (from step 1 on: masks change after an
        optimizer step, never at step 0)."""
        if self.steps is not None:
            return sum(1 for s in self.steps if 0 < s < step)
        first = self.start if self.start > 0 else self.freq
        last = step - 1 if self.stop is None else min(step - 1, self.stop - 1)
        return 0 if last < first else (last - self.start) // self.freq - (first - self.start) // self.freq + 1


def _exp(x: float) -> float:
    """``e^x``, +inf where it overflows (a schedule run far past its range: the level clamps)."""
    return math.inf if x > 709.0 else math.exp(x)


def _pow(base: float, step: int) -> float:
    try:
        return base**step
    except OverflowError:
        return math.inf if base > 0 or step % 2 == 0 else -math.inf


def parse_hyper(value: Any, where: str) -> HyperSchedule:
    """A number, a list (cycling) or ``{type: ..., ...}``; errors name the key."""
    value = number(value)
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number or a schedule {{type: ...}}, got {value!r}")
    if isinstance(value, (int, float)):
        return HyperSchedule("constant", (("value", _finite(value, where)),))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return HyperSchedule("cycling", (("values", _values(value, where)),))
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a number or a schedule {{type: ...}}, got {type(value).__name__}")
    kind = value.get("type")
    if not isinstance(kind, str) or kind.lower() not in HYPER_KINDS:
        raise ConfigError(f"{where}.type: {kind!r} is not valid; choose one of {', '.join(HYPER_KINDS)}")
    kind = kind.lower()
    required, optional = HYPER_KINDS[kind]
    valid = ("type", *required, *optional)
    for key in value:
        if key not in valid:
            raise ConfigError(f"{where}.{key_text(key)}: not a key of a {kind} schedule{closest(str(key), valid)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required by a {kind} schedule (keys: {', '.join(required)})")
    args = {k: value[k] if k in value else optional[k] for k in (*required, *optional)}  # the formula's order
    if kind == "cycling":
        return HyperSchedule(kind, (("values", _values(args["values"], f"{where}.values")),))
    parsed = {k: _finite(v, f"{where}.{k}") for k, v in args.items()}
    if kind == "cosine" and parsed["half_period"] <= 0:
        raise ConfigError(f"{where}.half_period: {parsed['half_period']!r} must be positive")
    return HyperSchedule(kind, tuple(parsed.items()))


def parse_update(value: Any, where: str) -> UpdateRule:
    """``{freq, start, stop}`` or ``{steps: [...]}``; None: every step."""
    if value is None:
        return UpdateRule()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected {{freq, start, stop}} or {{steps: [...]}}, got {type(value).__name__}")
    valid = ("steps",) if "steps" in value else ("freq", "start", "stop")
    for key in value:
        if key not in valid:
            raise ConfigError(f"{where}.{key_text(key)}: unknown key{closest(str(key), ('freq', 'start', 'stop', 'steps'))}"
                              if key not in ("freq", "start", "stop", "steps") else
                              f"{where}.{key}: give steps alone, or freq/start/stop")
    if "steps" in value:
        steps = value["steps"]
        if not isinstance(steps, Sequence) or isinstance(steps, str) or not steps:
            raise ConfigError(f"{where}.steps: expected a non-empty list of step numbers")
        return UpdateRule(steps=tuple(sorted({_count(s, f"{where}.steps", 1) for s in steps})))
    freq = _count(value.get("freq", 1), f"{where}.freq", 1)
    start = _count(value.get("start", 0), f"{where}.start", 0)
    stop = value.get("stop")
    stop = None if stop is None else _count(stop, f"{where}.stop", 1)
    if stop is not None and stop <= start:
        raise ConfigError(f"{where}.stop: {stop} is not after start {start}")
    return UpdateRule(freq=freq, start=start, stop=stop)


def _finite(value: Any, where: str) -> float:
    value = number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _values(values: Any, where: str) -> tuple[float, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of numbers")
    return tuple(_finite(v, f"{where}[{i}]") for i, v in enumerate(values))


def _count(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value
