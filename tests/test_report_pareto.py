"""pqsweep-report's Pareto side: the front of runs with known dominance (ties, NaN, a failed run), its hypervolume
against a reference worked out by hand, budgets, and what it logs back; then real sweeps: a finished one whose Optuna
study's best_trials must be the front, a partly failed one, and the two overlaid."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from matplotlib.image import imread
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend

from pqsweep.reports import page, report
from nets import experiment_ids

# (name, pruning, quantization, status, top1, size_mb). Objectives top1 (max), size_mb (min).
RUNS = [
    ("A", "gm", "none", "FINISHED", 90.0, 0.5),  # front: the most accurate
    ("B", "gm", "fp16", "FINISHED", 80.0, 0.2),  # front
    ("C", "gm", "fp16", "FINISHED", 80.0, 0.2),  # B's exact tie: neither dominates, both on the front
    ("D", "gm", "none", "FINISHED", 70.0, 0.3),  # dominated by B and C
    ("E", "l1", "none", "FINISHED", float("nan"), 0.1),  # NaN accuracy: never on the front, dominates nothing
    ("F", "gm", "none", "FAILED", 99.0, 0.01),  # failed: shown, never on the front
]
FRONT = {"A", "B", "C"}
# Reference: top1 -> the worst trial's 70 (the baseline's 92 beats every trial), size -> the baseline's 1.0.
# Minimising (-top1, size) against (-70, 1.0): A's box 20 x 0.5 = 10, B's 10 x 0.8 = 8, their overlap 10 x 0.5 = 5:
# 10 + 8 - 5 = 13 (C adds nothing to B, D touches the reference in top1).
HYPERVOLUME = 13.0


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment("pqsweep", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": "hand"}).info.run_id
    client.log_param(parent, "objectives", "top1,size_mb")
    ids = {}
    for name, pruning, quantization, status, top1, size in RUNS:
        run = client.create_run(experiment, run_name=name, tags={"stage": "trial", "sweep": "hand",
                                                                 "mlflow.parentRunId": parent, "baseline_hash": "b"})
        ids[name] = run.info.run_id
        client.log_batch(run.info.run_id, params=[Param("pruning", pruning), Param("quantization", quantization)],
                         metrics=[Metric("top1", top1, 0, 0), Metric("size_mb", size, 0, 0)])
        client.set_terminated(run.info.run_id, status)
    baseline = client.create_run(experiment, tags={"stage": "baseline", "baseline_hash": "b"}).info.run_id
    client.log_batch(baseline, metrics=[Metric(k, v, 0, 0) for k, v in
                                        {"top1": 92.0, "size_mb": 1.0, "size_gzip_mb": 0.9,
                                         "latency_ms_p50": 0.1}.items()])
    return uri, client, parent, ids


def test_the_front_of_runs_with_known_dominance_is_marked_tagged_and_logged(store, tmp_path, capsys):
    uri, client, parent, ids = store
    report.main(["hand", "--uri", uri, "--out", str(tmp_path / "out"), "--csv", str(tmp_path / "t.csv")])
    out = capsys.readouterr().out
    by_id = {v: k for k, v in ids.items()}
    with open(tmp_path / "t.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert "top1 (%)" in reader.fieldnames and "size_mb (MB)" in reader.fieldnames
        rows = list(reader)
    assert len(rows) == len(RUNS)
    assert {r["top1 (%)"] for r in rows} >= {"90.0", "80.0", "70.0", ""}  # numbers; the NaN cell empty
    assert {r["status"] for r in rows} == {"FINISHED", "FAILED"}
    for name, run_id in ids.items():  # the MLflow filter tags.pareto = "true" shows exactly the front
        assert client.get_run(run_id).data.tags["pareto"] == str(name in FRONT).lower(), name
    assert sum(r["front"] == "1" for r in rows) == len(FRONT)
    assert f"3 trials, hypervolume {HYPERVOLUME:g}" in out
    assert "top1=70 (worst trial), size_mb=1 (baseline)" in out
    tags = client.get_run(parent).data.tags
    assert float(tags["pareto_hypervolume"]) == pytest.approx(HYPERVOLUME)
    assert tags["pareto_front_size"] == "3" and tags["pareto_objectives"] == "top1:max,size_mb:min"
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/table.csv", "report/table.md", "report/table.tex", "report/top1_vs_size_mb.png",
            "report/report.html"} <= logged
    image = imread(tmp_path / "out" / "top1_vs_size_mb.png")
    assert image.shape[0] > 300 and image.std() > 0.05  # drawn, not blank

    report.main(["hand", "--uri", uri, "--front", "--no-plots", "--no-log", "--csv", str(tmp_path / "front.csv")])
    with open(tmp_path / "front.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(FRONT)


def test_a_budget_gives_each_methods_most_compressed_trial_within_it(store, capsys):
    uri, *_, ids = store
    report.main(["hand", "--uri", uri, "--budget", "top1>=75", "--no-plots", "--no-log",
                "--columns", "pruning,quantization,top1,size_mb"])
    out = capsys.readouterr().out.split("budget top1>=75")[1]
    lines = {line.split()[0]: line for line in out.splitlines()[3:] if line.strip()[:2] in ("gm", "l1")}
    assert ids["A"] in lines["gm·none"]  # D is smaller but below 75; F is smaller still but failed
    assert ids["B"] in lines["gm·fp16"] or ids["C"] in lines["gm·fp16"]
    assert lines["l1·none"].split()[1:] == ["-"] * 5  # nothing of l1 within the budget (its only run is NaN)


def test_bad_objectives_and_budgets_are_refused_in_one_line_and_nothing_is_logged(store):
    uri, client, parent, ids = store
    for args, message in ((["--objectives", "top1:up"], "direction must be max or min"),
                          (["--budget", "top1=>3"], "bound 'top1=>3'")):
        with pytest.raises(SystemExit, match=message) as refused:
            report.main(["hand", "--uri", uri, *args])
        assert "\n" not in str(refused.value)
    assert "pareto" not in client.get_run(ids["A"]).data.tags
    assert not client.list_artifacts(parent)


# -- real sweeps ------------------------------------------------------------------------------------------------

TINY = ["dataset=digits", "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=1", "measure.repeats=2",
        "measure.top5=false", "study.objectives=[top1,size_gzip_mb]"]


def sweep(tmp_path: Path, *args: str, rc: int = 0) -> None:
    command = [sys.executable, "-m", "pqsweep.cli", "-m", *TINY, *args,
               f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == rc, done.stderr[-3000:]


@pytest.mark.slow
def test_real_sweeps_front_equals_optunas_best_trials_failures_stay_off_and_two_overlay(tmp_path, capsys):
    sweep(tmp_path, "pruning=global_magnitude", "pruning.amount=0,0.5,0.9", "quantization=none,static_int8",
          "study.name=gm")
    (tmp_path / "bad.yaml").write_text("conv9: 0.5\n")  # a layer the cnn does not have: fails inside its run
    (tmp_path / "good.yaml").write_text('"0": 0.5\n')
    sweep(tmp_path, "pruning=layer_magnitude", f"pruning.layer_amounts={tmp_path}/good.yaml,{tmp_path}/bad.yaml",
          "study.name=layers", rc=1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    report.main(["gm", "--uri", uri, "--out", str(tmp_path / "gm")])
    out = capsys.readouterr().out
    assert "Optuna's best_trials are this front" in out
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    best = {t.number for t in optuna.load_study(study_name="gm", storage=storage).best_trials}
    client = MlflowClient()
    trials = client.search_runs(experiment_ids(client),
                                "tags.optuna_study = 'gm' and tags.stage = 'trial'")
    assert len(trials) == 6
    assert {int(r.data.tags["optuna_trial_number"]) for r in trials if r.data.tags["pareto"] == "true"} == best
    parent = trials[0].data.tags["mlflow.parentRunId"]
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/top1_vs_size_gzip_mb.png" in logged and "report/report.html" in logged
    assert {"top1_vs_size_gzip_mb", "optuna_pareto_front"} <= set(page.figures(tmp_path / "gm" / "report.html"))

    report.main(["layers", "--uri", uri, "--out", str(tmp_path / "layers"), "--no-plots"])
    layers = client.search_runs(experiment_ids(client),
                                "tags.optuna_study = 'layers' and tags.stage = 'trial'")
    (failed,) = [r for r in layers if r.info.status == "FAILED"]
    assert failed.data.tags["pareto"] == "false"
    assert capsys.readouterr().err.count("1 trial failed") == 1

    report.main(["gm", "layers", "--uri", uri, "--out", str(tmp_path / "both")])
    out = capsys.readouterr().out
    assert "front of gm over top1 (max), size_gzip_mb (min)" in out
    assert "front of layers over top1 (max), size_gzip_mb (min)" in out
    with open(tmp_path / "both" / "table.csv", newline="") as f:
        assert {r["sweep"] for r in csv.DictReader(f)} == {"gm", "layers"}
    traces = page.figures(tmp_path / "both" / "report.html")["top1_vs_size_gzip_mb"]["data"]
    fronts = {t["name"] for t in traces if t["meta"]["kind"] == "front"}
    assert {"front: gm", "front: layers"} <= fronts  # each sweep's own front line, labelled
