"""A sweep's trials as a table: its columns (each metric's header, unit and format from pqsweep.metrics), rows in grid
order, text, markdown, LaTeX and CSV, and what the report computes from them: the front's hypervolume and the most
compressed trial per method within a budget. `pqsweep-report` (pqsweep.reports.report) prints and writes them."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run

from pqsweep.metrics import METRICS
from pqsweep.reports import pareto
from pqsweep.reports.sweeps import Sweep, metric

PARAMS = {"pruning": "pruning", "pruning.amount": "amount", "quantization": "quant", "quantization.bits": "bits"}
STANDARD = ["sparsity", "top1", "top1_delta", "size_mb", "size_gzip_mb", "size_sparse_mb", "reduction_factor",
            "reduction_factor_gzip", "latency_ms_p50"]
DEFAULT_OBJECTIVES = ["top1", "size_mb"]


@dataclass(frozen=True)
class Column:
    key: str
    kind: str  # params, metrics, tags, info (the run's status), front (a mark), sweep (the sweep's name)
    header: str
    unit: str = ""
    fmt: str = "{}"

    @property
    def csv_header(self) -> str:
        return f"{self.key} ({self.unit})" if self.unit else self.key


@dataclass
class Row:
    sweep: Sweep
    run: Run
    front: bool


def column(key: str, runs: list[Run]) -> Column:
    """The column for a name: a metric a run logged, else a param; `params.x`, `metrics.x`, `tags.x` say which."""
    kind, _, name = key.partition(".") if key.startswith(("params.", "metrics.", "tags.")) else ("", "", key)
    if key == "status":
        return Column("status", "info", "status")
    if key in ("front", "sweep"):
        return Column(key, key, key)
    if not kind:
        kind = "metrics" if any(name in r.data.metrics for r in runs) or name in METRICS else "params"
    if kind == "metrics":
        known = METRICS.get(name)
        return Column(name, kind, known.header, known.unit, known.fmt) if known else \
            Column(name, kind, name, "", "{:.4g}")
    return Column(name, kind, PARAMS.get(name, name) if kind == "params" else name)


def default_columns(sweeps: list[Sweep], objectives: list[pareto.Objective]) -> list[str]:
    """The methods' own keys, the swept keys, the standard metrics, the other objectives; the front mark, the status."""
    runs = [r for s in sweeps for r in s.trials]
    logged = {k for r in runs for k in r.data.params}
    keys = ["sweep"] if len(sweeps) > 1 else []
    keys += [k for k in PARAMS if k in logged] + [k for s in sweeps for k in s.swept]
    keys += STANDARD + [o.name for o in objectives] + ["front", "status"]
    return list(dict.fromkeys(keys))


def raw(row: Row, col: Column) -> Any:
    """The cell's value as logged: a float for metrics (None when missing or NaN), a string otherwise."""
    if col.kind == "metrics":
        return metric(row.run, col.key)
    if col.kind == "info":
        return row.run.info.status
    if col.kind == "front":
        return row.front
    if col.kind == "sweep":
        return row.sweep.name
    return getattr(row.run.data, col.kind).get(col.key)


def shown(row: Row, col: Column) -> str:
    value = raw(row, col)
    if col.kind == "front":
        return "*" if value else ""
    return "-" if value is None else col.fmt.format(value)


def number(text: str | None, default: float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return default


def order(row: Row, swept: list[str]) -> tuple:
    """Grid order: sparsity up, precision from high to low, then the option's name and the other swept keys."""
    params = row.run.data.params
    rest = tuple((number(params.get(k), math.inf), str(params.get(k))) for k in swept)
    return (row.sweep.name, number(params.get("pruning.amount"), 0.0), -number(params.get("quantization.bits"), 32),
            params.get("quantization", ""), rest)


def render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def latex(header: list[str], body: list[list[str]]) -> str:
    def esc(text: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                     ("Δ", r"$\Delta$"), ("·", r"$\cdot$")):
            text = text.replace(a, b)
        return text

    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule", " & ".join(map(esc, header)) + r" \\",
             r"\midrule"] + [" & ".join(map(esc, cells)) + r" \\" for cells in body] + [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, columns: list[Column], rows: list[Row]) -> None:
    """Numbers as numbers (units in the header), missing values empty, the front as 1 / 0."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c.csv_header for c in columns])
        for row in rows:
            cells = [raw(row, c) for c in columns]
            writer.writerow(["" if v is None else int(v) if isinstance(v, bool) else v for v in cells])


# -- fronts, hypervolume, budgets ----------------------------------------------------------------------------------


def values(run: Run, objectives: list[pareto.Objective]) -> list[float] | None:
    """A finished trial's objective values; None for any other (never on the front)."""
    if run.info.status != "FINISHED":
        return None
    found = [metric(run, o.name) for o in objectives]
    return None if any(v is None for v in found) else found


def method(run: Run, sweep: Sweep) -> str:
    """What a trial applied, for colours and budgets: `pruning·quantization`, with the bits where the sweep varies them."""
    params = run.data.params
    label = f"{params.get('pruning', '?')}·{params.get('quantization', '?')}"
    if "quantization.bits" in sweep.swept and params.get("quantization.bits") not in (None, "None"):
        label += params["quantization.bits"]
    return label


def point(run: Run, sweep: Sweep) -> dict[str, Any]:
    return {**{k: metric(run, k) for k in run.data.metrics}, "method": method(run, sweep), "status": run.info.status,
            "run_id": run.info.run_id}


def compressed_by(objectives: list[pareto.Objective]) -> pareto.Objective:
    """What "most compressed" means for a budget: the first size objective, else the first minimised one."""
    sizes = [o for o in objectives if o.name.startswith("size") and o.direction == "minimize"]
    minimised = [o for o in objectives if o.direction == "minimize"]
    return (sizes or minimised or [pareto.Objective("size_mb", "minimize")])[0]


def hypervolumes(sweeps: list[Sweep], rows: list[Row], objectives) -> tuple[dict[str, float], str]:
    """Each sweep's front hypervolume against one reference point (so several sweeps compare), and its description."""
    baselines = {s.baseline.info.run_id if s.baseline else None for s in sweeps}
    baseline = sweeps[0].baseline.data.metrics if len(baselines) == 1 and sweeps[0].baseline else None
    finite = [dict(zip([o.name for o in objectives], v)) for r in rows if (v := values(r.run, objectives))]
    if not finite:
        return {}, "no finished trial has every objective"
    reference, described = pareto.reference_point(objectives, baseline, finite)
    volumes = {}
    for sweep in sweeps:
        front = [values(r.run, objectives) for r in rows if r.sweep is sweep and r.front]
        volumes[sweep.name] = pareto.hypervolume(front, objectives, reference)
    return volumes, described


def within_budget(rows: list[Row], bounds, objectives) -> tuple[str, dict[str, Row | None]]:
    """(what "most compressed" means here, per method the most compressed finished trial within `bounds`)."""
    compress = compressed_by(objectives)
    several = len({r.sweep.name for r in rows}) > 1
    dicts = [{**(point(r.run, r.sweep) if r.run.info.status == "FINISHED" else {}),
              "method": f"{r.sweep.name}: {method(r.run, r.sweep)}" if several else method(r.run, r.sweep)}
             for r in rows]
    chosen = pareto.within_budget(dicts, bounds, "method", compress)
    return compress.name, {m: None if i is None else rows[i] for m, i in chosen.items()}
