"""A report's weight and how soon it shows: one page with one plotly.js against the old HTML file per plot.

    .venv/bin/python benchmarks/report_weight.py             # a 2 x 2 grid on digits (~1.5 min), 3 loads each
    .venv/bin/python benchmarks/report_weight.py --loads 5

Runs the issue's case in a fresh folder: sweeps/mnist_cnn_sparsity_x_precision.yaml on digits for 1 epoch (+1 of
fine-tuning), its grid narrowed to pruning.amount 0 / 0.5 x quantization none / static_int8 (4 trials), then
`pqsweep-report` over it: three fronts (gzip size, latency, MACs) and Optuna's Pareto front and hypervolume history. The old layout is rebuilt from the same figures: each
figure the page holds written as its own HTML file with plotly.js embedded (`write_html(include_plotlyjs=True)`, what
pqsweep.reports.plots wrote before), beside the same PNGs and tables. Both are measured in the same run, on the same
machine: bytes on disk, and in headless chromium (as tests/test_ui.py launches it) the first contentful paint (the
Paint Timing API) and the time until every plotly figure is drawn, loads interleaved, the median of --loads. The
machine is shared, so only the ratios mean much. Writes results/report_weight.csv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plotly.graph_objects as go
from timed_sweep import BIN, ROOT, pinned

from pqsweep.reports import page

sys.path.insert(0, str(ROOT / "tests"))
from test_ui import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (the suite's one way to launch chromium here)

SWEEP = "mnist_cnn_sparsity_x_precision"
GRID = [f"sweep={SWEEP}", "dataset=digits", "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=2",
        "measure.repeats=5", "pruning.amount=0,0.5", "quantization=none,static_int8"]


def old_layout(new: Path, old: Path) -> list[Path]:
    """The report as it was: the tables and PNGs, and one HTML file per figure, each with plotly.js inside."""
    old.mkdir()
    for path in new.iterdir():
        if path.suffix != ".html":
            (old / path.name).write_bytes(path.read_bytes())
    pages = []
    for name, figure in page.figures(new / "report.html").items():
        pages.append(old / f"{name}.html")
        go.Figure(figure).write_html(pages[-1], include_plotlyjs=True)
    return pages


def load_times(browser, path: Path, figures: int) -> tuple[float, float]:
    """(first contentful paint, every plotly figure drawn) in seconds, of one fresh load."""
    view = browser.new_page(viewport={"width": 1100, "height": 900})
    start = time.perf_counter()
    view.goto(path.as_uri(), wait_until="commit")
    view.wait_for_function("performance.getEntriesByName('first-contentful-paint').length > 0", timeout=60000)
    paint = view.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime") / 1000
    view.wait_for_function(f"document.querySelectorAll('.main-svg').length >= {figures}", timeout=60000)
    drawn = time.perf_counter() - start
    view.close()
    return paint, drawn


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=3, help="loads of each page in chromium (median taken)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = pinned(1)
        subprocess.run([str(BIN / "pqsweep"), "-m", *GRID], cwd=work, env=env, check=True, capture_output=True)
        subprocess.run([str(BIN / "pqsweep-report"), SWEEP, "--no-log", "--out", "new"], cwd=work, env=env,
                       check=True, capture_output=True)
        new, old = work / "new", work / "old"
        pages = old_layout(new, old)
        figures = len(pages)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            times = {"one page": [], "file per plot": []}
            for _ in range(args.loads):  # interleaved, so a burst of load elsewhere hits both
                times["one page"].append(load_times(browser, new / "report.html", figures))
                times["file per plot"].append(load_times(browser, pages[0], 1))
            browser.close()
        rows = []
        for layout, folder, html in (("one page", new, [new / "report.html"]), ("file per plot", old, pages)):
            paint = statistics.median(t[0] for t in times[layout])
            drawn = statistics.median(t[1] for t in times[layout])
            rows.append({"layout": layout, "figures": figures, "html_files": len(html),
                         "html_mb": round(sum(h.stat().st_size for h in html) / 1e6, 2),
                         "report_mb": round(size(folder) / 1e6, 2), "first_paint_s": round(paint, 2),
                         "drawn_s": round(drawn, 2), "drawn_of": "all figures" if layout == "one page" else
                         "its one figure"})
    out = ROOT / "results" / "report_weight.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"{r['layout']:>13}: {r['html_files']} HTML files, {r['html_mb']} MB of HTML, report {r['report_mb']} MB; "
              f"first paint {r['first_paint_s']} s, drawn ({r['drawn_of']}) {r['drawn_s']} s")
    one, per = rows
    print(f"ratios (file per plot / one page): report {per['report_mb'] / one['report_mb']:.1f}x heavier, first paint "
          f"{per['first_paint_s'] / one['first_paint_s']:.1f}x later; wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
