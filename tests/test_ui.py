"""The MLflow UI a new user opens after a sweep: `mlflow server` on loopback over the sweep's store, driven by Debian's
headless Chromium through Playwright, from the link the sweep prints to its runs table and one trial.

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
    """A 2 x 2 grid on digits, its models logged; returns its folder and what it printed."""
    folder = tmp_path_factory.mktemp("ui")
    command = [sys.executable, "-m", "pqsweep.cli", "-m", "pruning=global_magnitude", "pruning.amount=0.5,0.9",
               "quantization=none,static_int8", f"study.name={STUDY}", "tracking.log_model=true", *TINY,
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


def test_a_new_user_sees_the_study_its_nested_trials_their_metrics_data_and_models(sweep, browser, tmp_path):
    folder, printed = sweep
    # the sweep's last line says where to look: `mlflow ui --backend-store-uri ...` and the page to open
    (store, page_path), = re.findall(r"mlflow ui --backend-store-uri (\S+)` and open http://127\.0\.0\.1:5000/(\S+)",
                                     printed)
    client = MlflowClient(store)
    (parent,) = client.search_runs(experiment_ids(client), "tags.stage = 'sweep'")
    trials = {r.info.run_name: r for r in client.search_runs(experiment_ids(client), "tags.stage = 'trial'")}
    assert set(trials) == TRIALS and client.get_experiment(parent.info.experiment_id).name == STUDY
    shots = screenshots(tmp_path)

    with running_mlflow_server(store, folder / "served") as server:
        page = browser.new_page(viewport={"width": 2200, "height": 1000})

        page.goto(f"{server}/#/experiments")
        page.get_by_role("link", name=STUDY).wait_for(timeout=60_000)  # the study is an experiment of its own
        assert "click Model training" in page.inner_text("body")  # its description says how to see its runs
        page.screenshot(path=shots / "1-experiments.png")

        page.goto(f"{server}/{page_path}")
        grid = page.get_by_role("grid").first
        parent_row = page.get_by_role("row").filter(has_text=f"sweep-{STUDY}")
        parent_row.wait_for(timeout=60_000)
        assert page.get_by_text("Token Usage").count() == 0  # the model-training view, not GenAI's overview
        # the columns the study's view opens with (its run names say the quantization: MLflow 3.17 selects that
        # param's column but leaves it out of the table, seen here)
        headers = {h.strip() for h in grid.get_by_role("columnheader").all_inner_texts()}
        assert {"top1", "top1_delta", "size_mb", "size_sparse_mb", "latency_ms_p50", "pruning.amount", "Dataset",
                "Models"} <= headers, headers
        assert page.get_by_role("row").filter(has_text="cnn·gm").count() == 0  # the trials are folded under it
        page.screenshot(path=shots / "2-study.png")

        parent_row.get_by_role("button").first.click()  # unfold the study: its trials, nested under it
        for name in TRIALS:
            row = page.get_by_role("row").filter(has_text=name)
            row.wait_for(timeout=30_000)
            # the table draws a row in parts (the pinned name, the scrolled columns), one element each
            index = row.get_attribute("aria-rowindex")
            cells = " ".join(page.locator(f'[role="row"][aria-rowindex="{index}"]').all_inner_texts())
            assert repr(trials[name].data.metrics["top1"])[:6] in cells  # its top1, as the store holds it
            assert "digits" in cells  # its data set, in the Dataset column
            assert "compressed_model" in cells  # its logged model, in the Models column
        page.screenshot(path=shots / "3-trials.png")

        run = trials["cnn·gm0.9·int8"]
        page.get_by_role("link", name=run.info.run_name).click()  # one trial's page, as a user opens it
        page.get_by_text("latency_ms_p50").first.wait_for(timeout=60_000)
        assert run.info.run_id in page.url
        # Its page: metrics, params, data sets and model. (MLflow 3.17 draws its side bar in the GenAI mode again:
        # the link's workflowType lasts one page, unless the user clicks "Model training", which the browser keeps.)
        page.get_by_text("compressed_model").first.wait_for(timeout=60_000)  # its logged model, loaded last
        body = page.inner_text("body")
        assert repr(run.data.metrics["top1"])[:6] in body and "digits (" in body
        page.screenshot(path=shots / "4-trial.png", full_page=True)
        page.close()
    assert sorted(p.name for p in shots.glob("*.png")) == ["1-experiments.png", "2-study.png", "3-trials.png",
                                                           "4-trial.png"]
