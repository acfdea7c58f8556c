"""Pareto fronts of compression trials as pictures: a PNG to read and a plotly figure to hover, from plain data (no
MLflow).

    plots = plot_standard([Series("mnist_cnn_sparsity_x_precision", points, front, baseline)], Path("report"))

writes report/top1_vs_size_mb.png, and the same against latency_ms_p50 and macs where the trials have them, and
returns each with its interactive figure; pqsweep.reports.page puts them all on one HTML page with one copy of
plotly.js.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from optuna.trial import TrialState

from pqsweep.reports.page import Plot

log = logging.getLogger(__name__)

UNITS = {
    "top1": "top-1 accuracy (%)",
    "top5": "top-5 accuracy (%)",
    "top1_delta": "top-1 change from the baseline (pp)",
    "size_mb": "size as stored (MB)",
    "size_gzip_mb": "gzip size (MB)",
    "size_sparse_mb": "sparse size (MB)",
    "size_theoretical_mb": "non-zeros x bits (MB)",
    "reduction_factor": "size reduction (x)",
    "reduction_factor_gzip": "gzip size reduction (x)",
    "latency_ms_p50": "latency p50, batch 1 (ms)",
    "latency_ms_p90": "latency p90, batch 1 (ms)",
    "macs": "MACs",
    "params_nonzero": "non-zero parameters",
    "params_total": "parameters",
    "sparsity": "sparsity (fraction of weights zero)",
}

# One marker per sweep when several are overlaid: (matplotlib, plotly) spellings of the same shape.
MARKERS = [("o", "circle"), ("s", "square"), ("^", "triangle-up"), ("D", "diamond"), ("v", "triangle-down"),
           ("P", "cross"), ("X", "x"), ("<", "triangle-left"), (">", "triangle-right")]
FRONT_STYLES = [("-", "solid"), ("--", "dash"), (":", "dot"), ("-.", "dashdot")]
LOG_SPAN = 20.0  # log_x=None: a log x axis when the largest x is more than this many times the smallest
MIN_IMPORTANCE_TRIALS = 10  # fewer complete trials give parameter importances that are mostly noise


@dataclass
class Series:
    """One sweep's trials: the points, which of them are on its Pareto front, and its dense fp32 baseline."""

    label: str  # the sweep's name (several Series = several sweeps overlaid)
    points: list[dict[str, Any]]  # per trial: metric values by name, plus "method", "status" and "run_id"
    front: list[bool]  # same length as points: on the Pareto front
    baseline: dict[str, float] | None = None  # the dense fp32 baseline's metrics, marked on every plot


def axis_label(metric: str) -> str:
    """The axis label of a metric: its words and unit, or its own name when UNITS does not know it."""
    return UNITS.get(metric, metric)


def number(value: Any) -> float | None:
    """`value` as a finite float (numpy's numbers too), or None (missing, NaN, infinite, not a number): such a point
    cannot be placed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def drawable(point: dict[str, Any], x: str, y: str) -> bool:
    """A finished trial with a finite x and y; a point without "status" is taken as finished (hand-made data)."""
    finished = point.get("status", "FINISHED") == "FINISHED"
    return finished and number(point.get(x)) is not None and number(point.get(y)) is not None


def method(point: dict[str, Any]) -> str:
    return str(point.get("method", "?"))


def not_shown(series: list[Series], x: str, y: str) -> int:
    """How many trials the plot leaves out: failed, killed or still running, or without a finite x or y."""
    return sum(not drawable(p, x, y) for s in series for p in s.points)


def method_colours(series: list[Series]) -> dict[str, str]:
    """A hex colour per method, from the sorted names of every method in `series`, failed trials' included, so a
    method keeps its colour whichever of its trials a plot can show. Pass one dict to every plot of a report."""
    methods = sorted({method(p) for s in series for p in s.points})
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: to_hex(cmap(i % cmap.N)) for i, m in enumerate(methods)}


def wants_log(series: list[Series], x: str, y: str) -> bool:
    """A log x axis when the drawn x values (baselines included) are positive and span more than LOG_SPAN times."""
    xs = [number(p[x]) for s in series for p in s.points if drawable(p, x, y)]
    xs += [number(s.baseline.get(x)) for s in series if s.baseline]
    xs = [v for v in xs if v is not None]
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN


def baselines(series: list[Series], x: str, y: str) -> list[tuple[str, float, float]]:
    """(label, x, y) per distinct baseline that has both metrics; sweeps of one baseline share a single star."""
    seen, out = [], []
    for s in series:
        if not s.baseline or s.baseline in seen:
            continue
        seen.append(s.baseline)
        bx, by = number(s.baseline.get(x)), number(s.baseline.get(y))
        if bx is not None and by is not None:
            out.append((s.label, bx, by))
    if len(out) == 1:
        out = [("dense fp32 baseline", out[0][1], out[0][2])]
    else:
        out = [(f"baseline: {label}", bx, by) for label, bx, by in out]
    return out


def title(series: list[Series], x: str, y: str) -> str:
    """'y vs x', the sweep when there is one, and how many trials are not shown."""
    text = f"{y} vs {x}" + (f" — {series[0].label}" if len(series) == 1 else "")
    hidden = not_shown(series, x, y)
    if hidden:
        text += f"\n{hidden} failed trial{'s' if hidden != 1 else ''} not shown"
    return text


def front_label(series: list[Series], s: Series) -> str:
    return "Pareto front" if len(series) == 1 else f"front: {s.label}"


def front_members(s: Series, x: str, y: str) -> list[dict[str, Any]]:
    """The drawable points on the front, sorted by x: the order the step line goes through them."""
    members = [p for p, on in zip(s.points, s.front, strict=True) if on and drawable(p, x, y)]
    return sorted(members, key=lambda p: (number(p[x]), number(p[y])))


def front_figure(series: list[Series], x: str, y: str, colours: dict[str, str] | None = None,
                 log_x: bool | None = None) -> Figure:
    """The PNG's figure. Per sweep: its points coloured by method in its own marker, its front members larger with
    a black edge, and its front as a step line (post: a member's y holds until the next member's x). Each point is
    drawn once (off-front points per method, front members in one collection with gid "front:<label>"), so the
    drawn markers count the shown trials."""
    colours = colours or method_colours(series)
    fig = Figure(figsize=(9.5, 5.5), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever backend pyplot would pick; no pyplot state is touched
    ax = fig.add_subplot()
    sweep_handles = []
    for i, s in enumerate(series):
        marker, style = MARKERS[i % len(MARKERS)][0], FRONT_STYLES[i % len(FRONT_STYLES)][0]
        off = [p for p, on in zip(s.points, s.front, strict=True) if not on and drawable(p, x, y)]
        for name in sorted({method(p) for p in off}):
            mine = [p for p in off if method(p) == name]
            ax.scatter([p[x] for p in mine], [p[y] for p in mine], s=36, marker=marker, color=colours[name],
                       alpha=0.75, linewidths=0, gid=f"points:{s.label}:{name}", zorder=2)
        members = front_members(s, x, y)
        if members:
            xs, ys = [p[x] for p in members], [p[y] for p in members]
            ax.step(xs, ys, where="post", color="black", linestyle=style, linewidth=1.3, zorder=3,
                    label=front_label(series, s), gid=f"front-line:{s.label}")
            ax.scatter(xs, ys, s=90, marker=marker, color=[colours[method(p)] for p in members],
                       edgecolors="black", linewidths=1.4, gid=f"front:{s.label}", zorder=4)
        sweep_handles.append(Line2D([], [], color="black", linestyle=style, marker=marker, markersize=8,
                                    markerfacecolor="white", label=front_label(series, s)))
    star_handles = []
    for label, bx, by in baselines(series, x, y):
        ax.scatter([bx], [by], s=320, marker="*", color="gold", edgecolors="black", linewidths=1.0, zorder=5,
                   gid="baseline")
        ax.annotate(label, (bx, by), xytext=(-12, 6), textcoords="offset points", ha="right", va="bottom",
                    fontsize="small", bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "linewidth": 0})
        star_handles.append(Line2D([], [], linestyle="", marker="*", markersize=14, color="gold",
                                   markeredgecolor="black", label=label))
    shown = sorted({method(p) for s in series for p in s.points if drawable(p, x, y)})
    method_handles = [Line2D([], [], linestyle="", marker="o", markersize=7, color=colours[m], label=m) for m in shown]
    # Outside the axes, so the legend never covers a point however the trials fall.
    ax.legend(handles=method_handles + sweep_handles + star_handles, loc="upper left", bbox_to_anchor=(1.02, 1),
              borderaxespad=0, fontsize="small", title="method / sweep")
    if wants_log(series, x, y) if log_x is None else log_x:
        ax.set_xscale("log")
        # 1-2-5 ticks written as plain numbers: matplotlib's default labels every minor tick as 3x10^-3 when the
        # axis spans under two decades, and neighbours overlap.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.set_title(title(series, x, y))
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0.04, y=0.1)  # headroom for the baseline's label, which sits above its star at the top
    return fig


def hover(s: Series, p: dict[str, Any], x: str, y: str) -> str:
    """The method, sweep, run id and every numeric value of a trial, x and y first."""
    lines = [f"<b>{method(p)}</b>", f"sweep: {s.label}", f"run: {p.get('run_id', '?')}"]
    keys = [x, y] + sorted(k for k in p if k not in (x, y))
    lines += [f"{k}: {v:.6g}" for k in keys if (v := number(p.get(k))) is not None]
    return "<br>".join(lines)


def front_plotly(series: list[Series], x: str, y: str, colours: dict[str, str] | None = None,
                 log_x: bool | None = None) -> go.Figure:
    """The HTML's figure, drawn as front_figure draws: one marker trace per sweep and method (front members larger,
    black-edged), one step-line trace per sweep's front, one star per baseline. Values are plain lists, so the
    HTML's JSON holds the numbers themselves."""
    colours = colours or method_colours(series)
    fig = go.Figure()
    legend_done = set()
    for i, s in enumerate(series):
        symbol, dash = MARKERS[i % len(MARKERS)][1], FRONT_STYLES[i % len(FRONT_STYLES)][1]
        shown = [(p, on) for p, on in zip(s.points, s.front, strict=True) if drawable(p, x, y)]
        for name in sorted({method(p) for p, _ in shown}):
            mine = [(p, on) for p, on in shown if method(p) == name]
            fig.add_trace(go.Scatter(
                x=[p[x] for p, _ in mine], y=[p[y] for p, _ in mine], mode="markers", name=name,
                legendgroup=name, showlegend=name not in legend_done, text=[hover(s, p, x, y) for p, _ in mine],
                hovertemplate="%{text}<extra></extra>", meta={"kind": "points", "sweep": s.label},
                marker={"symbol": symbol, "color": colours[name], "size": [13 if on else 8 for _, on in mine],
                        "line": {"color": "black", "width": [1.5 if on else 0 for _, on in mine]}},
            ))
            legend_done.add(name)
        members = front_members(s, x, y)
        if members:
            fig.add_trace(go.Scatter(
                x=[p[x] for p in members], y=[p[y] for p in members], mode="lines", line_shape="hv",
                line={"color": "black", "dash": dash, "width": 1.5}, name=front_label(series, s),
                hoverinfo="skip", meta={"kind": "front", "sweep": s.label},
            ))
    for label, bx, by in baselines(series, x, y):
        fig.add_trace(go.Scatter(
            x=[bx], y=[by], mode="markers+text", name=label, text=[label], textposition="top left",
            marker={"symbol": "star", "size": 20, "color": "gold", "line": {"color": "black", "width": 1}},
            hovertemplate=f"{label}<br>{x}: %{{x:.6g}}<br>{y}: %{{y:.6g}}<extra></extra>", meta={"kind": "baseline"},
        ))
    log_scale = wants_log(series, x, y) if log_x is None else log_x
    head, _, note = title(series, x, y).partition("\n")
    fig.update_layout(
        title=head + (f"<br><sup>{note}</sup>" if note else ""),
        xaxis={"title": axis_label(x), "type": "log" if log_scale else "linear"}, yaxis={"title": axis_label(y)},
        template="plotly_white", hovermode="closest", legend={"title": "method / sweep"},
    )
    return fig


def plot_front(series: list[Series], x: str, y: str, out: Path, stem: str, log_x: bool | None = None,
               colours: dict[str, str] | None = None) -> Plot:
    """Write out/<stem>.png of y against x and return it with its interactive figure; log_x None: log when x spans
    more than LOG_SPAN."""
    out.mkdir(parents=True, exist_ok=True)
    colours = colours or method_colours(series)
    png = out / f"{stem}.png"
    front_figure(series, x, y, colours, log_x).savefig(png, dpi=120)
    return Plot(stem, front_plotly(series, x, y, colours, log_x), png)


def plot_standard(series: list[Series], out: Path, accuracy: str = "top1", size: str = "size_mb") -> list[Plot]:
    """Accuracy against size, latency p50 and MACs, each where some finished trial has the metric; one colour per
    method across the three. Each plot draws the front of its own two axes (accuracy up, the other down): a front
    over other objectives zigzags on these axes."""
    from pqsweep.reports.pareto import Objective, pareto_front

    colours = method_colours(series)
    plots = []
    for x in (size, "latency_ms_p50", "macs"):
        if any(drawable(p, x, accuracy) for s in series for p in s.points):
            axes = [Objective(accuracy, "maximize"), Objective(x, "minimize")]
            own = [dataclasses.replace(s, front=pareto_front(
                [[number(p[accuracy]), number(p[x])] if drawable(p, x, accuracy) else None for p in s.points], axes))
                for s in series]
            plots.append(plot_front(own, x, accuracy, out, f"{accuracy}_vs_{x}", colours=colours))
    return plots


def hypervolume_reference(study: optuna.Study, complete: list[optuna.trial.FrozenTrial]) -> list[float]:
    """Each objective's worst value over complete trials, pushed 10 % of its range (or 1 % of itself, or 1) further,
    so the worst trials still add volume."""
    reference = []
    for k, direction in enumerate(study.directions):
        values = [t.values[k] for t in complete]
        worst = max(values) if direction == optuna.study.StudyDirection.MINIMIZE else min(values)
        nudge = 0.1 * (max(values) - min(values)) or 0.01 * abs(worst) or 1.0
        reference.append(worst + nudge if direction == optuna.study.StudyDirection.MINIMIZE else worst - nudge)
    return reference


def optuna_views(study: optuna.Study, prefix: str = "optuna_") -> list[Plot]:
    """Optuna's own views of a study where they add something to the fronts, named <prefix><view>: the Pareto front
    and the hypervolume history (multi-objective) and the parameter importances (>= 2 parameters shared by every
    complete trial and MIN_IMPORTANCE_TRIALS of them). What is skipped or what Optuna refuses is logged with its
    reason."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        log.info("optuna_views: study %s has no complete trial; no views", study.study_name)
        return []
    names = study.metric_names
    views = {}
    if len(study.directions) > 1:
        views["pareto_front"] = lambda: optuna.visualization.plot_pareto_front(study, target_names=names)
        views["hypervolume_history"] = lambda: optuna.visualization.plot_hypervolume_history(
            study, hypervolume_reference(study, complete))  # experimental in Optuna since 3.3; warns each call
    else:
        log.info("optuna_views: study %s has one objective; no Pareto front or hypervolume", study.study_name)
    params = optuna.search_space.intersection_search_space(complete)
    if len(params) >= 2 and len(complete) >= MIN_IMPORTANCE_TRIALS:
        # fANOVA ranks parameters by the variance of each objective they explain, whichever way it is optimised;
        # Optuna's default (PED-ANOVA) ranks them for *low* values of each objective, wrong for accuracy.
        views["param_importances"] = lambda: optuna.visualization.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    else:
        log.info("optuna_views: no parameter importances for %s: %d shared parameters, %d complete trials "
                 "(needs >= 2 and >= %d)", study.study_name, len(params), len(complete), MIN_IMPORTANCE_TRIALS)
    plots = []
    for name, make in views.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fig = make()
        except (ValueError, RuntimeError) as e:  # Optuna's refusals: too many objectives, no variance, ...
            log.info("optuna_views: skipped %s for %s: %s", name, study.study_name, e)
            continue
        plots.append(Plot(f"{prefix}{name}", fig))
    return plots
