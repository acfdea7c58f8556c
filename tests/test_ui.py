"""The MLflow UI a new user opens after a sweep: `mlflow server` on loopback over the sweep's store, driven by Debian's
headless Chromium through Playwright at 1600 x 1000, from the link the sweep prints to its runs table, its chart, the
Models tab and one trial.

Screenshots go to $PQSWEEP_SCREENSHOTS (.ci/run sets screenshots/ui/) or, without it, the test's tmp_path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nets import TINY, experiment_ids
from servers import running_mlflow_server, unavailable

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # Debian's package chromium; .ci/run installs it
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
STUDY = "ui_demo"
TRIALS = {"cnn·gm0.5·fp32", "cnn·gm0.5·int8", "cnn·gm0.9·fp32", "cnn·gm0.9·int8"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    """A 2 x 2 grid on digits with two objectives (accuracy, size), its models logged; returns its folder and what it
    printed."""
    folder = tmp_path_factory.mktemp("ui")
    command = [sys.executable, "-m", "pqsweep.cli", "-m", "pruning=global_magnitude", "pruning.amount=0.5,0.9",
               "quantization=none,static_int8", f"study.name={STUDY}", "study.objectives=[top1,size_mb]",
               "tracking.log_model=true", *TINY,
               f"tracking.uri=sqlite:///{folder}/mlflow.db", f"cache.dir={folder}/cache"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done.stdout + done.stderr


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PQSWEEP_SCREENSHOTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cells(page, column: str):
    """The table's cells of one column (ag-grid's col-id: `metrics.`top1``); it draws only the columns in sight."""
    return page.locator(f'[role="gridcell"][col-id="{column}"]')


def in_sight(box: dict, frame: dict) -> bool:
    return (box["x"] >= frame["x"] and box["y"] >= frame["y"] and box["x"] + box["width"] <= frame["x"] + frame["width"]
            and box["y"] + box["height"] <= frame["y"] + frame["height"])


def test_a_new_user_sees_the_study_its_trials_objectives_chart_and_models(sweep, browser, tmp_path):
    folder, printed = sweep
    # the sweep's last line says where to look: `mlflow ui --backend-store-uri ...` and the page to open
    (store, page_path), = re.findall(r"mlflow ui --backend-store-uri (\S+)` and open http://127\.0\.0\.1:5000/(\S+)",
                                     printed)
    client = MlflowClient(store)
    (parent,) = client.search_runs(experiment_ids(client), "tags.stage = 'sweep'")
    trials = {r.info.run_name: r for r in client.search_runs(experiment_ids(client), "tags.stage = 'trial'")}
    assert set(trials) == TRIALS and client.get_experiment(parent.info.experiment_id).name == STUDY
    # the grid's front on (top1 up, size_mb down): int8 halves size at no loss at 0.5
    front = {name for name, run in trials.items() if run.data.tags.get("pareto") == "true"}
    assert front == {"cnn·gm0.5·int8"} and {r.data.tags["pareto"] for r in trials.values()} == {"true", "false"}
    shots = screenshots(tmp_path)
    window = {"x": 0, "y": 0, "width": 1600, "height": 1000}

    with running_mlflow_server(store, folder / "served") as server:
        page = browser.new_page(viewport={"width": window["width"], "height": window["height"]})

        page.goto(f"{server}/#/experiments")
        page.get_by_role("link", name=STUDY).wait_for(timeout=60_000)  # the study is an experiment of its own
        assert "click Model training" in page.inner_text("body")  # its description says how to see its runs
        page.screenshot(path=shots / "1-experiments.png")

        page.goto(f"{server}/{page_path}")
        grid = page.get_by_role("grid").first
        for name in TRIALS:  # every trial is a row at once: none folded under the study's parent run
            page.get_by_role("row").filter(has_text=name).first.wait_for(timeout=60_000)
        assert page.get_by_text("Token Usage").count() == 0  # the model-training view, not GenAI's overview
        frame = grid.bounding_box()
        # the objectives first, then the swept params, each cell in sight in a 1600 x 1000 window without scrolling
        headers = [h.strip() for h in grid.get_by_role("columnheader").all_inner_texts()]
        for column, shown in [("metrics.`top1`", "top1"), ("metrics.`size_mb`", "size_mb"),
                              ("params.`pruning.amount`", "pruning.amount"), ("params.`quantization`", "quantization")]:
            assert shown in headers, headers
            found = cells(page, column)
            assert found.count() == 6, column  # the parent, the baseline and four trials
            for cell in found.all():
                assert in_sight(cell.bounding_box(), frame) and in_sight(cell.bounding_box(), window), column
        # sorted best first by the first objective, as the store holds it (top to bottom on screen; the DOM's order
        # is the grid's own)
        top1 = [c.inner_text()
                for c in sorted(cells(page, "metrics.`top1`").all(), key=lambda c: c.bounding_box()["y"])]
        best = max(trials.values(), key=lambda r: r.data.metrics["top1"])
        assert top1[0].startswith(repr(best.data.metrics["top1"])[:6]), top1
        page.screenshot(path=shots / "2-study.png")

        # the Chart tab (its icon, a radio button's label): the study's scatter, every run on it
        page.locator("label", has=page.locator('input[value="CHART"]')).click()
        page.get_by_text("pqsweep: objectives").first.wait_for(timeout=30_000)
        points = page.locator(".scatterlayer .point")
        points.nth(4).wait_for(timeout=30_000)
        assert points.count() == 5  # four trials and the baseline (the parent run has no metrics)
        assert page.get_by_text("top1", exact=True).count() and page.get_by_text("size_mb", exact=True).count()
        page.screenshot(path=shots / "3-chart.png")

        page.goto(f"{server}/#/experiments/{parent.info.experiment_id}/models?workflowType=machine_learning")
        page.get_by_text("compressed_model").nth(3).wait_for(timeout=60_000)  # the Models tab: the study's models
        assert page.get_by_text("compressed_model").count() == 4
        page.screenshot(path=shots / "4-models.png")

        run = trials["cnn·gm0.9·int8"]
        page.goto(f"{server}/{page_path}")
        page.get_by_role("link", name=run.info.run_name).click()  # one trial's page, as a user opens it
        page.get_by_text("latency_ms_p50").first.wait_for(timeout=60_000)
        assert run.info.run_id in page.url
        # Its page: metrics, params, data sets and model. (MLflow 3.17 draws its side bar in the GenAI mode again:
        # the link's workflowType lasts one page, unless the user clicks "Model training", which the browser keeps.)
        page.get_by_text("compressed_model").first.wait_for(timeout=60_000)  # its logged model, loaded last
        body = page.inner_text("body")
        assert repr(run.data.metrics["top1"])[:6] in body and "digits (" in body
        page.screenshot(path=shots / "5-trial.png", full_page=True)
        page.close()
    assert sorted(p.name for p in shots.glob("*.png")) == ["1-experiments.png", "2-study.png", "3-chart.png",
                                                           "4-models.png", "5-trial.png"]
