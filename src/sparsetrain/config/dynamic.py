"""Dynamic sparsity's settings of one group (the zoo's 2.x ``gmp``, ``set``, ``rigl``), parsed
from the keys of a ``sparsity:`` block into a :class:`DynamicSettings`.

    sparsity:
      algorithm: rigl                 # or type:; gmp | set | rigl (static / sideband: fixed masks)
      sparsity: 0.75                  # a number, or a schedule {type: ...} (gmp: must change)
      update: {freq: 100, stop: 3584} # or {steps: [...]}; none: every step
      drop_fraction: {type: cosine, init: 0.3, half_period: 3584}   # set / rigl; default 0.3

Meaning, the zoo's (``cerebras.pytorch.sparse``), t = optimizer steps done:

- masks change only after the t-th optimizer step when ``update`` says t is an update step, at
  the level ``sparsity(t)`` (clamped to [0, 1]) and drop fraction ``drop_fraction(t)``;
- a run whose update rule includes step 0 starts sparse at ``sparsity(0)``; one whose rule
  starts later (``start > 0``, or ``steps`` without 0) starts DENSE, as the zoo does;
- ``cycling`` values move on one per update step; the initial mask counts as one for the
  sparsity schedule (the zoo's), not for the drop fraction;
- ``schedule:`` in a 2.0-2.1 file is the update rule (``{freq, stop}``); from 2.2 on it is an
  alias of ``sparsity``. The value's shape says which: ``freq`` / ``start`` / ``stop`` /
  ``steps`` keys are an update rule, a number, a list or ``{type: ...}`` a level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sparsetrain.config.schedules import HyperSchedule, UpdateRule, parse_hyper
from sparsetrain.config.sparsity_values import parse_fraction
from sparsetrain.errors import ConfigError

DYNAMIC_TYPES = ("gmp", "set", "rigl")
DROPPING_TYPES = ("set", "rigl")
DEFAULT_DROP_FRACTION = 0.3  # the zoo's
UPDATE_RULE_KEYS = ("freq", "start", "stop", "steps")


@dataclass(frozen=True)
class DynamicSettings:
    """How a group's masks change: ``algorithm`` gmp | set | rigl, its level and drop-fraction
    schedules, and the update rule."""

    algorithm: str
    sparsity: HyperSchedule
    update: UpdateRule
    drop_fraction: HyperSchedule | None = None
    where: str = field(default="sparsity.sparsity", compare=False)  # the level's key, for messages

    @property
    def starts_sparse(self) -> bool:
        """Whether the initial mask is sparse (step 0 is an update step) or dense (the zoo's rule)."""
        return self.update.is_update(0)

    @property
    def initial_sparsity(self) -> float:
        return clamp(self.sparsity.value(0, 0)) if self.starts_sparse else 0.0

    def level(self, step: int, updates_done: int) -> float:
        """The target sparsity at update step ``step``, the ``updates_done``-th (0-based) since
        the start."""
        return clamp(self.sparsity.value(step, updates_done + int(self.starts_sparse)))

    def drop(self, step: int, updates_done: int) -> float:
        if self.drop_fraction is None:
            return 0.0
        return clamp(self.drop_fraction.value(step, updates_done))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sparsity": self.sparsity.to_value()}
        update = self.update.to_value()
        if update is not None:
            out["update"] = update
        if self.drop_fraction is not None:
            out["drop_fraction"] = self.drop_fraction.to_value()
        return out

    def describe(self) -> str:
        text = f"{self.algorithm} sparsity {self.sparsity.describe()}, updates {self.update.describe()}"
        if self.drop_fraction is not None:
            text += f", drop_fraction {self.drop_fraction.describe()}"
        return text + ("" if self.starts_sparse else ", starting dense")


def clamp(value: float) -> float:
    return min(max(float(value), 0.0), 1.0)


def is_update_rule(value: Any) -> bool:
    """Whether a ``schedule:`` value is an update rule (2.0-2.1) rather than a level (2.2+)."""
    return isinstance(value, Mapping) and "type" not in value and any(k in value for k in UPDATE_RULE_KEYS)


def split_schedule(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``block`` with ``schedule:`` put where it belongs: ``update`` (2.0-2.1) or ``sparsity``."""
    if "schedule" not in block:
        return dict(block)
    out = {k: v for k, v in block.items() if k != "schedule"}
    value = block["schedule"]
    target = "update" if is_update_rule(value) else "sparsity"
    if target in block:
        meaning = "the update rule {freq, stop} (2.0-2.1)" if target == "update" else "an alias of sparsity (2.2+)"
        raise ConfigError(f"{where}.schedule: here {meaning}, and {where}.{target} is set too; give one of them")
    out[target] = value
    return out


def check_dynamic_keys(algorithm: str, block: Mapping[str, Any], where: str) -> None:
    """Keys that only some algorithms read are errors elsewhere (never silently ignored)."""
    if algorithm not in DYNAMIC_TYPES:
        for key in ("update", "drop_fraction"):
            if key in block:
                raise ConfigError(
                    f"{where}.{key}: read only by dynamic sparsity (algorithm gmp, set or rigl); this block is "
                    f"static (fixed masks): remove it or set the algorithm"
                )
    elif algorithm == "gmp" and "drop_fraction" in block:
        raise ConfigError(f"{where}.drop_fraction: gmp only prunes (by |w|); drop_fraction is read by set and rigl")


def parse_level(value: Any, algorithm: str, where: str) -> HyperSchedule:
    """The ``sparsity`` value of a dynamic group: a number or a schedule; gmp's must change."""
    schedule = parse_hyper(value, where)
    if schedule.kind == "cycling":
        for i, v in enumerate(dict(schedule.args)["values"]):
            parse_fraction(v, f"{where}[{i}]")
    if algorithm == "gmp" and schedule.kind == "constant":
        raise ConfigError(
            f"{where}: gmp with a constant sparsity {schedule.to_value():g} would never change the masks; give a "
            "schedule ({type: linear | exp | power | cosine | cycling, ...}) or use algorithm: static"
        )
    return schedule


def build_dynamic(
    algorithm: str, level: HyperSchedule, update: UpdateRule | None, drop_fraction: HyperSchedule | None,
    where: str = "sparsity.sparsity",
) -> DynamicSettings:
    if algorithm in DROPPING_TYPES and drop_fraction is None:
        drop_fraction = parse_hyper(DEFAULT_DROP_FRACTION, "drop_fraction")
    dropping = drop_fraction if algorithm in DROPPING_TYPES else None
    return DynamicSettings(algorithm, level, update or UpdateRule(), dropping, where)


def check_levels(dyn: DynamicSettings, max_steps: int) -> None:
    """A level of 1 or more prunes every weight: an error when the schedule gets there at an update
    step within ``max_steps`` (formulas are monotone: their ends decide; cosine's peak is init or
    minimum; cycling's values). Below 0 is clamped to 0 (dense), as the zoo does."""
    steps = dyn.update.steps_until(max_steps)
    checks = [(0, 0)] if dyn.starts_sparse else []
    if steps:
        checks += [(steps[0], 0), (steps[-1], len(steps) - 1)]
    values = [(dyn.sparsity.value(t, j + int(dyn.starts_sparse) if t else 0), t) for t, j in checks]
    args = dict(dyn.sparsity.args)
    if dyn.sparsity.kind == "cosine":
        values += [(args["minimum"], None)]
    for value, step in values:
        if not value < 1.0:
            at = f" at step {step}" if step is not None else ""
            raise ConfigError(
                f"{dyn.where}: the {dyn.sparsity.kind} schedule reaches {value:.4g}{at} (update steps up to "
                f"runconfig.max_steps {max_steps}): a level of 1 prunes every weight; keep it below 1 (a gentler "
                "schedule, or update.stop before it gets there)"
            )


def parse_drop_fraction(value: Any, where: str) -> HyperSchedule:
    """A number or a schedule; constants and cycling values must lie in [0, 1] (the message says
    what the number means and guesses no other value, as :func:`parse_fraction` does)."""
    schedule = parse_hyper(value, where)
    fixed = {"constant": [(where, schedule.to_value())],
             "cycling": [(f"{where}[{i}]", v) for i, v in enumerate(dict(schedule.args).get("values", ()))]}
    for key, v in fixed.get(schedule.kind, []):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(
                f"{key}: {v:g} is not valid; the fraction of kept entries dropped, in [0, 1] (e.g. 0.3 drops "
                "30% of them at each update)"
            )
    return schedule
