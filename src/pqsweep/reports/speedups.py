"""Speed where it runs: each front point's latency speed-up over the baseline in every runtime the sweep measured
(`measure.runtimes`, pqsweep.runtimes), its MACs ratio beside, and flags where another runtime takes the speed-up
away or turns it round. Pure functions over metrics and tags, so the report calls them on runs read from MLflow and
the benchmark and tests on dicts.

speed-up (runtime r) = baseline latency_ms_p50 in r / the point's latency_ms_p50 in r: both from the same runtime, as
MACs x = baseline MACs / the point's MACs is a claim about work and not about time. A point's flags, per runtime r
other than eager:
- `reverses in r`: its speed-up in r lies on the other side of 1.0 from its eager speed-up (faster than the baseline
  in one, slower in the other), each by more than NOISE (5 %, the p50's spread between measurements here);
- `<=1x in r`: otherwise, no speed-up in r (<= 1.0).
A runtime that could not run the point (or the baseline) shows `n/a: <reason>` from the run's `runtime.<r>` tag.
"""

from __future__ import annotations

import re
from typing import Mapping

from pqsweep.reports import pareto
from pqsweep.runtimes import EAGER, EXTRA, NOT_AVAILABLE, RUNTIMES, p50, tag

CELL_REASON = 40  # characters of a reason a cell shows; the whole one is the run's tag
# A reversal is told only where both speed-ups are more than this away from 1.0: the p50 of one model moves by about
# 5 % between measurements on the shared 2-core machine (MeasureConfig's comment; benchmarks/speed.py stability).
NOISE = 0.05
LABELS = {"torchscript": "ts", "onnxruntime": "ort", "compile": "compile"}  # short, for the flags column


def measured(tagged: list[Mapping[str, str]]) -> list[str]:
    """The runtimes besides eager that any of these runs measured or tried (each leaves its tag), in RUNTIMES order."""
    return [r for r in EXTRA if any(tag(r) in tags for tags in tagged)]


def speedup(metrics: Mapping[str, float], tags: Mapping[str, str], base_metrics: Mapping[str, float],
            base_tags: Mapping[str, str], runtime: str) -> tuple[float | None, str | None]:
    """(baseline p50 / point p50 in `runtime`, None), or (None, why there is none)."""
    point, base = metrics.get(p50(runtime)), base_metrics.get(p50(runtime))
    if point is None:
        return None, tags.get(tag(runtime), "not measured").removeprefix(NOT_AVAILABLE)
    if base is None:
        return None, "baseline: " + base_tags.get(tag(runtime), "not measured").removeprefix(NOT_AVAILABLE)
    return base / point, None


def flags(eager: float | None, others: Mapping[str, float | None]) -> list[str]:
    """The module doc's flags for a point whose eager speed-up is `eager` and whose speed-ups elsewhere are `others`."""
    found = []
    for runtime, value in others.items():
        if value is None:
            continue
        label = LABELS.get(runtime, runtime)
        if eager is not None and (eager - 1.0) * (value - 1.0) < 0 and min(abs(eager - 1), abs(value - 1)) > NOISE:
            found.append(f"reverses in {label}")
        elif value <= 1.0:
            found.append(f"<=1x in {label}")
    return found


def cell(value: float | None, why: str | None) -> str:
    if value is not None:
        return f"{value:.2f}x"
    why = re.sub(r"^(baseline: )?[A-Z]\w*(Error|Exception): ", r"\1", why)  # the class name says little here
    short = why if len(why) <= CELL_REASON else why[:CELL_REASON - 3] + "..."
    return f"n/a: {short}"


def table(points: list[tuple[str, Mapping[str, float], Mapping[str, str]]], base_metrics: Mapping[str, float],
          base_tags: Mapping[str, str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows, one per (name, metrics, tags) point: MACs x, then the speed-up in eager and in each runtime
    measured, then the flags."""
    runtimes = measured([tags for _, _, tags in points] + [base_tags])
    header = ["point", "MACs x", f"{EAGER} x", *(f"{r} x" for r in runtimes), "flags"]
    body = []
    for name, metrics, tags in points:
        macs, base_macs = metrics.get("macs"), base_metrics.get("macs")
        eager, why = speedup(metrics, tags, base_metrics, base_tags, EAGER)
        others = {r: speedup(metrics, tags, base_metrics, base_tags, r) for r in runtimes}
        marks = flags(eager, {r: value for r, (value, _) in others.items()})
        body.append([name, f"{base_macs / macs:.2f}x" if macs and base_macs else "-", cell(eager, why),
                     *(cell(*others[r]) for r in runtimes), ", ".join(marks) or "-"])
    return header, body


def kept(rows: list[Mapping[str, float]], objectives: list[pareto.Objective], runtime: str) -> tuple[int, int]:
    """(front points that stay on the front when latency_ms_p50 is taken from `runtime`, front size), the front
    being over `objectives` (latency_ms_p50 among them) with eager latency. A row `runtime` could not run has no
    latency there and so no place on the other front."""
    def values(latency: str) -> list[list[float] | None]:
        names = [latency if o.name == p50(EAGER) else o.name for o in objectives]
        return [None if any(row.get(n) is None for n in names) else [row[n] for n in names] for row in rows]

    eager_front = pareto.pareto_front(values(p50(EAGER)), objectives)
    other_front = pareto.pareto_front(values(p50(runtime)), objectives)
    return sum(a and b for a, b in zip(eager_front, other_front)), sum(eager_front)


assert set(LABELS) == set(EXTRA) and RUNTIMES[0] == EAGER  # a new runtime gets a short label here
