"""Points run at several seeds: each point as mean ± 95 % CI over its seeds, and two options of one factor compared
paired by seed, so a table says which difference is real and which is inside the noise.

    pqsweep-report recovery_cnn_mnist5k                                  # cells over seeds: mean ± CI (n)
    pqsweep-report recovery_cnn_mnist5k --compare train.distill.enabled  # each option against the first, by seed

A paired comparison takes, for each point of the other swept keys, the trials of option A and option B that share a
seed, and the difference B - A of each pair: the seed's baseline, data order and pruning are common to both, so the
difference carries the factor's effect with the seed's share of the noise removed. The CI is Student's t over the
seeds (n - 1 degrees of freedom); "real" where it excludes 0. Over all points, each seed contributes its mean
difference across the points, since a seed's points share its baseline and are not independent of each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev

from scipy.stats import t as student

from pqsweep.metrics import METRICS
from pqsweep.reports.sweeps import metric
from pqsweep.reports.table import Row

SEED = "train.seed"
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half the CI's width; NaN with one value
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def interval(values: list[float]) -> Interval:
    """Mean and the half-width of its 95 % CI (Student's t), from independent values."""
    if not values:
        raise ValueError("an interval needs at least one value")
    if len(values) == 1:
        return Interval(values[0], math.nan, 1)
    half = student.ppf(0.5 + LEVEL / 2, len(values) - 1) * stdev(values) / math.sqrt(len(values))
    return Interval(mean(values), half, len(values))


def seeded(rows: list[Row]) -> bool:
    """Whether the trials ran at more than one seed."""
    return len({r.run.data.params.get(SEED) for r in rows}) > 1


def finished(rows: list[Row], name: str) -> list[tuple[Row, float]]:
    return [(r, v) for r in rows if r.run.info.status == "FINISHED" and (v := metric(r.run, name)) is not None]


def fmt(name: str) -> str:
    known = METRICS.get(name)
    return known.fmt if known else "{:.4g}"


def shown(value: Interval, name: str) -> str:
    f = fmt(name)
    if value.n == 1:
        return f"{f.format(value.mean)} (n=1)"
    return f"{f.format(value.mean)} ± {f.format(value.half).lstrip('+')} (n={value.n})"


def summary(rows: list[Row], swept: list[str], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """One line per point of the swept keys other than the seed: each metric as mean ± 95 % CI over its seeds."""
    keys = [k for k in swept if k != SEED]
    points: dict[tuple, list[Row]] = {}
    for r in rows:
        points.setdefault(tuple(r.run.data.params.get(k, "-") for k in keys), []).append(r)
    header = [*keys, *(METRICS[m].header if m in METRICS else m for m in metrics)]
    body = []
    for point, members in points.items():
        cells = []
        for name in metrics:
            found = [v for _, v in finished(members, name)]
            cells.append(shown(interval(found), name) if found else "-")
        body.append([*point, *cells])
    return header, body


def levels(rows: list[Row], factor: str) -> list[str]:
    """The factor's values among the trials, numbers by value, other values by name (False before True, none
    before the rest in most recipes' naming)."""
    found = {r.run.data.params[factor] for r in rows if factor in r.run.data.params}
    return sorted(found, key=lambda v: (0, number(v), v) if number(v) is not None else (1, 0.0, v))


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def differences(rows: list[Row], swept: list[str], factor: str, a: str, b: str,
                name: str) -> dict[tuple, dict[str, float]]:
    """Per point of the other swept keys, per seed, the difference b - a of `name` between the two trials."""
    others = [k for k in swept if k not in (factor, SEED)]
    value: dict[tuple, float] = {}
    for r, v in finished(rows, name):
        params = r.run.data.params
        value[(tuple(params.get(k, "-") for k in others), params.get(SEED), params.get(factor))] = v
    found: dict[tuple, dict[str, float]] = {}
    for (point, seed, level), v in value.items():
        if level == b and (point, seed, a) in value:
            found.setdefault(point, {})[seed] = v - value[(point, seed, a)]
    return found


def over_points(found: dict[tuple, dict[str, float]]) -> list[float]:
    """One difference per seed, the mean over the points where that seed has a pair: the seed is the unit that
    repeats (its baseline is shared by all its points), so the CI of the effect over the grid is over seeds."""
    seeds = dict.fromkeys(seed for per_seed in found.values() for seed in per_seed)
    return [mean(per_seed[seed] for per_seed in found.values() if seed in per_seed) for seed in seeds]


def compare(rows: list[Row], swept: list[str], factor: str, name: str,
            wanted: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Each option of `factor` against its first (or the first of `wanted`): per point, paired by seed, and over all
    points (each seed's mean difference over the points)."""
    present = levels(rows, factor)
    if not present:
        raise ValueError(f"--compare {factor}: no trial has that param (swept: {', '.join(swept)})")
    chosen = wanted or present
    missing = [w for w in chosen if w not in present]
    if missing or len(chosen) < 2:
        raise ValueError(f"--compare {factor}={','.join(chosen)}: the trials have {factor} in {', '.join(present)}; "
                         "name two or more of those")
    others = [k for k in swept if k not in (factor, SEED)]
    f = fmt(name) if "+" in fmt(name) else fmt(name).replace("{:", "{:+", 1)  # a difference shows its sign
    header = [*others, "compared", f"Δ {name}", "95 % CI", "seeds", "verdict"]
    body = []
    for b in chosen[1:]:
        found = differences(rows, swept, factor, chosen[0], b, name)
        lines = [(point, list(per_seed.values())) for point, per_seed in found.items()]
        if len(found) > 1:
            lines.append((("all points",) + ("",) * (len(others) - 1), over_points(found)))
        for point, diffs in lines:
            i = interval(diffs)
            ci = "-" if i.n == 1 else f"[{f.format(i.low)}, {f.format(i.high)}]"
            verdict = "one seed" if i.n == 1 else "real" if i.excludes_zero() else "inside the noise"
            body.append([*point, f"{b} − {chosen[0]}", f.format(i.mean), ci, str(i.n), verdict])
    return header, body
