"""Trade-offs between a sweep's metrics: the Pareto front, its hypervolume, budgets, and Optuna-style constraints.

Pure functions over plain numbers, so the report command can call them on rows read from MLflow and tests can call
them on rows written by hand. A row that lacks a metric (a failed or partial run) is never on the front, never
dominates, never meets a budget and never counts towards a reference point.

    objectives = parse_objectives("top1:max,size_mb:min", default=["top1"])
    mask = pareto_front([[r["top1"], r["size_mb"]] for r in rows], objectives)
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna._hypervolume import compute_hypervolume  # private path, but the exact implementation Optuna itself uses

from pqsweep.console import plural

DIRECTIONS = {"max": "maximize", "min": "minimize"}


@dataclass(frozen=True)
class Objective:
    name: str  # a metric name, e.g. "top1", "size_mb", "latency_ms_p50"
    direction: str  # "maximize" | "minimize"

    def __post_init__(self):
        if self.direction not in DIRECTIONS.values():
            raise ValueError(f"objective {self.name!r}: direction must be maximize or minimize, not {self.direction!r}")

    def loss(self, value: float) -> float:
        """The value as something to minimise, Optuna's own normalisation (`_normalize_value`)."""
        return -value if self.direction == "maximize" else value


def parse_objectives(text: str | None, default: list[str]) -> list[Objective]:
    """"top1:max,size_mb:min,latency_ms_p50" -> Objectives; a bare name takes its direction from
    pqsweep.metrics, the one table of which way each metric is better. None -> the `default` names."""
    from pqsweep.metrics import METRICS  # torch-free; imported here so the module stays a leaf

    items = default if text is None else [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("objectives: none given; write e.g. top1:max,size_mb:min")
    objectives = []
    for item in items:
        name, _, suffix = item.partition(":")
        name, suffix = name.strip(), suffix.strip()
        if not name:
            raise ValueError(f"objective {item!r}: the metric name is empty")
        if suffix:
            if suffix not in DIRECTIONS:
                raise ValueError(f"objective {item!r}: direction must be max or min")
            direction = DIRECTIONS[suffix]
        elif name in METRICS and METRICS[name].direction:
            direction = METRICS[name].direction
        else:
            raise ValueError(f"objective {name!r} has no known direction; write {name}:max or {name}:min")
        if any(o.name == name for o in objectives):
            raise ValueError(f"objective {name!r} is given twice")
        objectives.append(Objective(name, direction))
    return objectives


def _number(value: Any) -> float | None:
    """The value as a float, or None where it is missing or NaN (infinities are numbers, as they are to Optuna)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _losses(row: list[float] | None, objectives: list[Objective]) -> tuple[float, ...] | None:
    """The row in minimisation space, or None where any value is missing."""
    if row is None:
        return None
    if len(row) != len(objectives):
        raise ValueError(f"a row has {plural(len(row), 'value')} for {plural(len(objectives), 'objective')}")
    values = [_number(v) for v in row]
    if any(v is None for v in values):
        return None
    return tuple(o.loss(v) for o, v in zip(objectives, values))


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Optuna's rule (`study._multi_objective._dominates`): no worse anywhere and not identical, so equal rows
    never dominate each other."""
    return a != b and all(x <= y for x, y in zip(a, b))


def pareto_front(values: list[list[float] | None], objectives: list[Objective]) -> list[bool]:
    """Which rows no other row dominates: the same set as Optuna's `Study.best_trials` for the same values, with a
    None or NaN row playing the part of a trial that did not complete. Quadratic, which a sweep's size allows."""
    losses = [_losses(row, objectives) for row in values]
    complete = [loss for loss in losses if loss is not None]
    return [loss is not None and not any(_dominates(other, loss) for other in complete) for loss in losses]


def hypervolume(values: list[list[float]], objectives: list[Objective], reference: list[float]) -> float:
    """The volume the rows dominate up to `reference`, by Optuna's exact WFG implementation
    (`optuna._hypervolume.compute_hypervolume`). Maximised objectives are negated in the points and the reference
    alike. A point that does not strictly dominate the reference (worse than it, or level with it, in some
    objective) dominates no volume inside the box, so it is dropped rather than passed on (Optuna refuses points
    outside the box); so is a row with a missing value. No point left: 0.0."""
    if len(reference) != len(objectives) or not all(math.isfinite(r) for r in reference):
        raise ValueError(f"reference {list(reference)} must be {len(objectives)} finite numbers, one per objective")
    bound = tuple(o.loss(r) for o, r in zip(objectives, reference))
    points = [loss for loss in (_losses(row, objectives) for row in values)
              if loss is not None and all(x < b for x, b in zip(loss, bound))]
    if not points:
        return 0.0
    return float(compute_hypervolume(np.asarray(points, dtype=float), np.asarray(bound, dtype=float)))


def reference_point(objectives: list[Objective], baseline: dict[str, float] | None,
                    rows: list[dict[str, float]]) -> tuple[list[float], str]:
    """The hypervolume's reference and a line saying where each coordinate came from. Per objective: the baseline's
    value where it is at least as bad as every trial (the volume then measures the gain over the uncompressed
    model), otherwise the worst trial value (a baseline better than every trial, as top1 usually is, would leave
    no volume at all). Trials are the rows with every objective present, the rows the hypervolume counts; the
    worst of them sits on the reference and so adds no volume itself."""
    complete = [row for row in rows if all(_number(row.get(o.name)) is not None for o in objectives)]
    reference, parts = [], []
    for o in objectives:
        trial_values = [_number(row[o.name]) for row in complete]
        worst = (min if o.direction == "maximize" else max)(trial_values, default=None)
        base = _number((baseline or {}).get(o.name))
        if base is not None and (worst is None or o.loss(base) >= o.loss(worst)):
            value, source = base, "baseline"
        elif worst is not None:
            value, source = worst, "worst trial"
        else:
            raise ValueError(f"reference: no trial has every objective and the baseline has no {o.name}")
        reference.append(value)
        parts.append(f"{o.name}={value:g} ({source})")
    return reference, "reference: " + ", ".join(parts)


OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
BOUND = re.compile(r"\s*([A-Za-z_][\w.]*)\s*(>=|<=|>|<)\s*(\S+)\s*")


@dataclass(frozen=True)
class Bound:
    metric: str
    op: str  # one of OPERATORS
    limit: float

    def __post_init__(self):
        if self.op not in OPERATORS:
            raise ValueError(f"bound on {self.metric!r}: op must be one of {', '.join(OPERATORS)}, not {self.op!r}")

    def holds(self, value: float | None) -> bool:
        """Whether the value meets the bound; a missing or NaN value never does."""
        value = _number(value)
        return value is not None and OPERATORS[self.op](value, self.limit)


def parse_bounds(text: str | None) -> list[Bound]:
    """"top1_delta>=-1,size_mb<=0.05" -> Bounds. None or blank -> none. Blank items (from a trailing comma when
    the caller joins repeated flags) are skipped."""
    bounds = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        match = BOUND.fullmatch(item)
        limit = _finite(match.group(3)) if match else None
        if limit is None:
            raise ValueError(f"bound {item.strip()!r}: write METRIC OP NUMBER with OP one of >=, <=, >, < "
                             "(e.g. top1_delta>=-1)")
        bounds.append(Bound(match.group(1), match.group(2), limit))
    return bounds


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def within_budget(rows: list[dict], bounds: list[Bound], group: str, compress: Objective) -> dict[str, int | None]:
    """For each value of row[group] (e.g. the method label), in order of first appearance: the index of the most
    compressed row (best on `compress`) among the rows meeting every bound and having a `compress` value; None
    where no row does. Ties go to the lower index, so the answer does not depend on anything but the rows' order."""
    chosen: dict[Any, int | None] = {}
    for i, row in enumerate(rows):
        key = row.get(group)
        chosen.setdefault(key, None)
        value = _number(row.get(compress.name))
        if value is None or not all(b.holds(row.get(b.metric)) for b in bounds):
            continue
        best = chosen[key]
        if best is None or compress.loss(value) < compress.loss(float(rows[best][compress.name])):
            chosen[key] = i
    return chosen


def constraint_values(metrics: dict[str, float], bounds: list[Bound]) -> list[float]:
    """One float per bound in Optuna's constraints convention: <= 0 means satisfied (size_mb<=0.05 ->
    size_mb - 0.05; top1_delta>=-1 -> -1 - top1_delta). A missing or NaN metric gives +inf, violated: Optuna
    refuses NaN constraints (constraints_func and Trial.set_constraint raise ValueError) but takes inf, which is
    infeasible (> 0) and ranks last among infeasible trials. Optuna has no strict form, so > and < are treated
    like >= and <=: a value equal to the limit gives 0.0, feasible, though Bound.holds says it misses."""
    out = []
    for b in bounds:
        value = _number(metrics.get(b.metric))
        if value is None:
            out.append(math.inf)
            continue
        excess = b.limit - value if b.op in (">=", ">") else value - b.limit
        out.append(math.inf if math.isnan(excess) else excess)  # inf - inf, from an infinite metric and limit
    return out
