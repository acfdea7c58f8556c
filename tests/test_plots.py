"""The Pareto-front plots, rendered for real from hand-made trials: what a reader of the PNG and the report's HTML page
would see, and how much it weighs and how soon it shows (headless chromium)."""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from matplotlib.image import imread

from pqsweep.reports import page
from pqsweep.reports.plots import (
    UNITS,
    Series,
    front_figure,
    front_plotly,
    method_colours,
    optuna_views,
    plot_front,
    plot_standard,
)

BASELINE = {"top1": 99.0, "size_mb": 1.7, "latency_ms_p50": 1.2, "macs": 3.0e5}


def trial(method, top1, size_mb, status="FINISHED", **more):
    return {"method": method, "status": status, "run_id": f"run-{method}-{size_mb}", "top1": top1, "size_mb": size_mb,
            "latency_ms_p50": 0.2 + size_mb / 2, **more}


def sweep(label="mnist_grid", shift=0.0) -> Series:
    """Seven trials: four on the front, two dominated, one FAILED and one finished with a NaN accuracy (not shown)."""
    points = [
        trial("global_magnitude·fp32", 98.9 + shift, 1.70),
        trial("global_magnitude·int8", 98.6 + shift, 0.43),
        trial("global_magnitude·int8", 97.0 + shift, 0.40),
        trial("l1_filter·int8", 97.5 + shift, 0.25),
        trial("l1_filter·int8", 95.0 + shift, 0.12),
        trial("l1_filter·fp32", 96.0 + shift, 1.00),
        trial("l1_filter·fp32", 90.0, 0.5, status="FAILED"),
        trial("global_magnitude·fp32", math.nan, 0.9),
    ]
    front = [True, True, False, True, True, False, False, False]
    return Series(label, points, front, BASELINE)


def collections(fig, prefix):
    return [c for c in fig.axes[0].collections if (c.get_gid() or "").startswith(prefix)]


def html_traces(plots, name=None):
    """The trace list of a plot as the report's page holds it (written and read back)."""
    plots = plots if isinstance(plots, list) else [plots]
    path = page.write(plots[0].png.parent / "page.html", "t", [], plots)
    return page.figures(path)[name or plots[0].name]["data"]


def test_plot_front_writes_a_real_png_and_its_figure(tmp_path):
    plot = plot_front([sweep()], "size_mb", "top1", tmp_path / "plots", "top1_vs_size_mb")
    png = tmp_path / "plots/top1_vs_size_mb.png"
    assert plot.png == png and plot.name == "top1_vs_size_mb" and list(png.parent.iterdir()) == [png]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(png)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert pixels[..., :3].var() > 0.01  # not a blank canvas
    assert plot.figure.to_plotly_json()["data"] == front_plotly([sweep()], "size_mb", "top1").to_plotly_json()["data"]


PLOTLY_JS = "plotly.js v"  # the banner at the top of plotly.min.js, once per copy


def report_page(tmp_path):
    """A report's page as pqsweep-report writes one: three fronts (size, latency, MACs) and Optuna's three views."""
    s = sweep()
    for p in s.points:
        p["macs"] = 1e5 * p["size_mb"]
    plots = plot_standard([s], tmp_path) + optuna_views(two_objective_study())
    return page.write(tmp_path / "report.html", "mnist_grid", ["ran on: data digits, scale cpu"], plots), plots


def test_a_reports_page_holds_every_plot_with_one_copy_of_plotly_js(tmp_path):
    path, plots = report_page(tmp_path)
    text = path.read_text()
    assert len(plots) == 6 and text.count(PLOTLY_JS) == 1
    assert len(text) < 6e6  # plotly.js (4.8 MB) once, the rest PNGs and numbers: six HTML files held 29 MB
    assert "<script src=" not in text and 'src="http' not in text  # one file, nothing fetched from anywhere
    assert len(re.findall(r'<img alt="top1_vs_\w+" src="data:image/png;base64,', text)) == 3  # each front's PNG, inside
    assert "ran on: data digits, scale cpu" in text  # the report's header first
    assert set(page.figures(path)) == {p.name for p in plots}


@pytest.mark.slow
def test_the_page_shows_every_plot_before_plotly_js_has_run_and_then_draws_them(tmp_path):
    """Headless chromium, as tests/test_ui.py launches it: the PNGs are on screen with scripts off; with scripts on,
    every plot becomes a live plotly figure."""
    from test_ui import CHROMIUM, CHROMIUM_ARGS

    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing")
    path, plots = report_page(tmp_path)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        still = browser.new_page(java_script_enabled=False)
        still.goto(path.as_uri())
        images = still.locator(".plot img")
        assert images.count() == 3
        assert all(images.nth(i).evaluate("i => i.complete && i.naturalWidth > 600") for i in range(3))
        still.screenshot(path=str(tmp_path / "still.png"), full_page=True)
        live = browser.new_page()
        live.goto(path.as_uri())
        live.wait_for_function(f"document.querySelectorAll('.plot.drawn').length == {len(plots)}", timeout=60000)
        assert live.locator(".plot.drawn img").first.is_hidden()  # the figure took the PNG's place
        live.screenshot(path=str(tmp_path / "live.png"), full_page=True)
        # as the MLflow UI shows an HTML artifact: from a blob URL in an iframe, where nothing beside the file loads
        still.close()
        live.close()
        host = browser.new_page()
        host.set_content("<iframe id='f' style='width:1000px;height:800px'></iframe>")
        host.evaluate("html => document.getElementById('f').src = URL.createObjectURL(new Blob([html], "
                      "{type: 'text/html'}))", path.read_text())
        for _ in range(100):
            framed = next((f for f in host.frames if f.url.startswith("blob:")), None)
            if framed:
                break
            host.wait_for_timeout(100)
        framed.wait_for_function(f"document.querySelectorAll('.plot.drawn').length == {len(plots)}", timeout=60000)
        browser.close()


def test_axes_are_the_metrics_with_their_units_and_the_title_counts_what_is_hidden():
    ax = front_figure([sweep()], "size_mb", "top1").axes[0]
    assert ax.get_xlabel() == UNITS["size_mb"] == "size as stored (MB)"
    assert ax.get_ylabel() == UNITS["top1"] == "top-1 accuracy (%)"
    assert "top1 vs size_mb" in ax.get_title() and "mnist_grid" in ax.get_title()
    assert "2 failed trials not shown" in ax.get_title()
    s = sweep()
    for p in s.points:
        p["energy_mj"] = 1.0
    assert front_figure([s], "size_mb", "energy_mj").axes[0].get_ylabel() == "energy_mj"  # no unit known: the name


def test_front_markers_are_the_front_and_failed_points_are_not_drawn():
    s = sweep()
    fig = front_figure([s], "size_mb", "top1")
    (front,) = collections(fig, "front:")
    assert len(front.get_offsets()) == sum(s.front) == 4
    drawn = np.concatenate([c.get_offsets() for c in collections(fig, "points:") + [front]])
    assert len(drawn) == 6  # eight trials less the FAILED one and the NaN one
    assert not any(np.allclose(xy, (0.5, 90.0)) for xy in drawn)  # the FAILED trial's coordinates
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_gid() == "front-line:mnist_grid"]
    assert list(line.get_xdata()) == [0.12, 0.25, 0.43, 1.70]  # through the members sorted by x
    assert len(collections(fig, "baseline")) == 1


def test_two_sweeps_overlaid_get_their_own_front_lines_and_markers_in_the_legend():
    a, b = sweep("sweep_a"), sweep("sweep_b", shift=-1.0)
    b.front = [True, False, False, True, True, False, False, False]
    fig = front_figure([a, b], "size_mb", "top1")
    lines = [ln for ln in fig.axes[0].lines if (ln.get_gid() or "").startswith("front-line:")]
    assert [ln.get_label() for ln in lines] == ["front: sweep_a", "front: sweep_b"]
    assert [len(c.get_offsets()) for c in collections(fig, "front:")] == [4, 3]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "front: sweep_a" in legend and "front: sweep_b" in legend
    assert legend.count("dense fp32 baseline") == 1  # one baseline shared by both sweeps, one star
    shapes = {c.get_gid().split(":")[1]: c.get_paths()[0].vertices.shape for c in collections(fig, "front:")}
    assert shapes["sweep_a"] != shapes["sweep_b"]  # circle and square


def test_html_holds_the_points_the_front_and_hover_text(tmp_path):
    s = sweep()
    traces = front_plotly([s], "size_mb", "top1").to_plotly_json()["data"]
    written = html_traces(plot_front([s], "size_mb", "top1", tmp_path, "f"))
    for data in (traces, written):
        points = [t for t in data if t["meta"]["kind"] == "points"]
        assert sum(len(t["x"]) for t in points) == 6
        assert sum(size == 13 for t in points for size in t["marker"]["size"]) == 4  # front members emphasised
        (front,) = [t for t in data if t["meta"]["kind"] == "front"]
        assert len(front["x"]) == sum(s.front) and front["line"]["shape"] == "hv"
        (star,) = [t for t in data if t["meta"]["kind"] == "baseline"]
        assert star["marker"]["symbol"] == "star" and star["x"] == [1.7]
        hover = next(t for t in points if t["name"] == "l1_filter·int8")["text"][0]
        assert "l1_filter·int8" in hover and "run-l1_filter·int8-0.25" in hover
        assert "top1: 97.5" in hover and "size_mb: 0.25" in hover and "latency_ms_p50: 0.325" in hover


def test_log_x_when_x_spans_more_than_twenty_times():
    s = sweep()
    assert front_figure([s], "size_mb", "top1").axes[0].get_xscale() == "linear"  # 0.12 .. 1.7: 14x
    s.points[4]["size_mb"] = 0.05  # 34x
    assert front_figure([s], "size_mb", "top1").axes[0].get_xscale() == "log"
    assert front_figure([s], "size_mb", "top1", log_x=False).axes[0].get_xscale() == "linear"
    assert front_plotly([s], "size_mb", "top1").layout.xaxis.type == "log"


def test_plot_standard_draws_what_the_trials_measured_in_one_colour_per_method(tmp_path):
    plots = plot_standard([sweep()], tmp_path)  # the trials have latency but no MACs
    assert [p.name for p in plots] == ["top1_vs_size_mb", "top1_vs_latency_ms_p50"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["top1_vs_latency_ms_p50.png", "top1_vs_size_mb.png"]
    colours = [{t["name"]: t["marker"]["color"] for t in html_traces(plots, p.name) if t["meta"]["kind"] == "points"}
               for p in plots]
    assert colours[0] == colours[1] == {m: c for m, c in method_colours([sweep()]).items()}
    assert len(set(colours[0].values())) == 4


def two_objective_study(n_trials=12, params=("amount", "bits")) -> optuna.Study:
    """A real in-memory study: maximise accuracy, minimise size, over a pruning amount and a bit width."""

    def objective(t):
        amount = t.suggest_float("amount", 0.0, 0.9) if "amount" in params else 0.5
        bits = t.suggest_categorical("bits", [4, 8, 32]) if "bits" in params else 8
        return 99 - 10 * amount**3 - (2 if bits == 4 else 0), (1 - amount) * bits / 32

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # set_metric_names, since Optuna 3.2
        study.set_metric_names(["top1", "size_mb"])
    study.optimize(objective, n_trials=n_trials)
    return study


def test_optuna_views_writes_its_html_views_of_a_real_study(tmp_path):
    plots = optuna_views(two_objective_study())
    assert [p.name for p in plots] == ["optuna_pareto_front", "optuna_hypervolume_history", "optuna_param_importances"]
    assert all(p.png is None and p.figure.data for p in plots)
    assert list(tmp_path.iterdir()) == []  # the figures go on the report's page; nothing is written here


def test_optuna_views_skips_importances_it_cannot_rank_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pqsweep.reports.plots"):
        plots = optuna_views(two_objective_study(n_trials=5, params=("amount",)))
    assert [p.name for p in plots] == ["optuna_pareto_front", "optuna_hypervolume_history"]
    assert "no parameter importances" in caplog.text and "1 shared parameters, 5 complete trials" in caplog.text


def test_optuna_views_of_a_study_without_complete_trials_writes_nothing(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert optuna_views(study) == []
