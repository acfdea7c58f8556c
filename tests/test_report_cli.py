"""pqsweep-report as a person uses it: which sweep it shows, how rows are ordered and aligned, what it says when
there is nothing to show."""

from __future__ import annotations

import csv
import time

import mlflow
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pqsweep.reports import table


def log_sweep(client, experiment, name, trials, baseline_hashes=("b" * 16,)):
    """A parent run and its trial children; `trials` are (params, metrics) pairs. Returns the parent's id."""
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": name}).info.run_id
    for i, (params, metrics) in enumerate(trials):
        tags = {"stage": "trial", "sweep": name, "mlflow.parentRunId": parent,
                "baseline_hash": baseline_hashes[i % len(baseline_hashes)]}
        run = client.create_run(experiment, tags=tags).info.run_id
        client.log_batch(run, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run, "FINISHED")
    return parent


def point(amount, quantization, bits, top1=90.0):
    params = {"pruning": "global_magnitude", "pruning.amount": amount, "quantization": quantization,
              "quantization.bits": bits}
    return params, {"top1": top1}


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(), uri


def body(out: str) -> list[dict[str, str]]:
    """The printed table's rows as {header: cell}, cut at the widths its dashed line gives (cells may be empty)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("pruning"))
    spans, at = [], 0
    for dashes in lines[start + 1].split("  "):
        spans.append((at, at + len(dashes)))
        at += len(dashes) + 2
    cut = lambda line: [line[a:b].strip() for a, b in spans]  # noqa: E731
    header = cut(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("front of", "  reference")):
            break
        rows.append(dict(zip(header, cut(line))))
    return rows


def test_the_newest_sweep_of_a_name_is_shown(client, capsys):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    log_sweep(client, experiment, "grid", [point("0.5", "none", "32", top1=11.0)])
    time.sleep(0.01)  # start times differ
    newest = log_sweep(client, experiment, "grid", [point("0.5", "none", "32", top1=22.0),
                                                   point("0.9", "none", "32", top1=33.0)])
    log_sweep(client, experiment, "other", [point("0.5", "none", "32", top1=44.0)])
    table.main(["grid", "--uri", uri])
    out = capsys.readouterr().out
    assert f"sweep grid: 2 trials under MLflow run {newest}" in out
    assert [row["top1 %"] for row in body(out)] == ["22.00", "33.00"]


def test_rows_sort_by_amount_then_precision_then_option_name(client, tmp_path):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    points = [point("0.5", "static_int8", "8"), point("0.5", "fp16", "16"), point("0.0", "mixed", "8"),
              point("0.5", "bf16", "16"), point("0.0", "none", "32")]
    log_sweep(client, experiment, "grid", points)
    table.main(["grid", "--uri", uri, "--csv", str(tmp_path / "t.csv")])
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [(r[1], r[2]) for r in rows] == [("0.0", "none"), ("0.0", "mixed"), ("0.5", "bf16"), ("0.5", "fp16"),
                                            ("0.5", "static_int8")]


def test_cells_are_right_aligned_in_columns_as_wide_as_their_widest_entry():
    assert table.render(["a", "bb", "c"], [["ccc", "d", "e"], ["f", "gg", "hhhh"]]) == (
        "  a  bb     c\n"
        "---  --  ----\n"
        "ccc   d     e\n"
        "  f  gg  hhhh")
    assert table.render(["a", "bb"], []) == "a  bb\n-  --"


def test_a_value_a_run_did_not_log_is_a_dash(client, capsys):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    log_sweep(client, experiment, "grid", [point("0.5", "static_int8", "8", top1=9.5)])  # only top1 logged
    table.main(["grid", "--uri", uri])
    (cells,) = body(capsys.readouterr().out)
    assert cells["top1 %"] == "9.50" and cells["status"] == "FINISHED"
    unlogged = ["sparsity", "Δ top1", "size MB", "gzip MB", "sparse MB", "reduction", "gzip red.", "p50 ms"]
    assert [cells[h] for h in unlogged] == ["-"] * len(unlogged)


def test_no_baseline_line_when_the_trials_have_several_baselines(client, capsys):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    log_sweep(client, experiment, "grid", [point("0.0", "none", "32"), point("0.5", "none", "32")],
              baseline_hashes=("a" * 16, "b" * 16))
    for key in ("a" * 16, "b" * 16):
        run = client.create_run(experiment, tags={"stage": "baseline", "baseline_hash": key}).info.run_id
        client.log_batch(run, metrics=[Metric(k, 1.0, 0, 0) for k in ("top1", "size_mb", "size_gzip_mb",
                                                                       "latency_ms_p50")])
    table.main(["grid", "--uri", uri])
    assert "baseline (fp32, dense)" not in capsys.readouterr().out


def test_the_baseline_line_is_the_trials_own_baseline(client, capsys):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    log_sweep(client, experiment, "grid", [point("0.0", "none", "32")], baseline_hashes=("b" * 16,))
    for key, top1 in (("a" * 16, 11.0), ("b" * 16, 22.0)):
        run = client.create_run(experiment, tags={"stage": "baseline", "baseline_hash": key}).info.run_id
        client.log_batch(run, metrics=[Metric("top1", top1, 0, 0)] + [Metric(k, 1.0, 0, 0) for k in
                                                                        ("size_mb", "size_gzip_mb", "latency_ms_p50")])
    table.main(["grid", "--uri", uri])
    assert "baseline (fp32, dense): top1 22.00%" in capsys.readouterr().out


def test_a_store_without_the_experiment_or_the_sweep_says_so(client):
    client, uri = client
    with pytest.raises(SystemExit, match=r"^pqsweep-report: no sweep 'grid' at sqlite:///.*; sweeps there: none$"):
        table.main(["grid", "--uri", uri])
    with pytest.raises(SystemExit, match=r"^pqsweep-report: no experiment 'mine' at sqlite:///"):
        table.main(["grid", "--uri", uri, "--experiment", "mine"])
    experiment = client.create_experiment("mine")
    log_sweep(client, experiment, "grid", [point("0.0", "none", "32")])
    log_sweep(client, client.create_experiment("other"), "elsewhere", [point("0.0", "none", "32")])
    with pytest.raises(SystemExit, match=r"^pqsweep-report: no sweep 'nope' in experiment 'mine' at sqlite:///"):
        table.main(["nope", "--uri", uri, "--experiment", "mine"])
    table.main(["grid", "--uri", uri, "--experiment", "mine"])  # found where --experiment says
    table.main(["elsewhere", "--uri", uri])  # and, without it, in whichever experiment holds it (each study its own)
    with pytest.raises(SystemExit, match=r"^pqsweep-report: no sweep 'elsewhere' in experiment 'mine' at .*"
                                         r"sweeps there: grid$"):
        table.main(["elsewhere", "--uri", uri, "--experiment", "mine"])


def test_the_default_store_is_mlflow_db_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    log_sweep(client, client.create_experiment("pqsweep"), "grid", [point("0.0", "none", "32")])
    mlflow.set_tracking_uri("file:///nowhere")  # main must set the URI itself
    table.main(["grid"])
    assert "sweep grid: 1 trials" in capsys.readouterr().out


def test_the_swept_keys_are_columns_and_what_only_says_where_or_follows_a_group_is_not(client, capsys):
    # train.finetune_lr was swept (the issue's example of a key the old fixed columns never showed); the runs' ids and
    # the quantization options' own keys differ too, but they say where a trial ran or follow the option's name
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    trials = []
    for i, (lr, quantization) in enumerate([("0.001", "none"), ("0.01", "none"), ("0.001", "static_int8")]):
        params, metrics = point("0.5", quantization, "8" if quantization == "static_int8" else "32", top1=90.0 + i)
        params |= {"train.finetune_lr": lr, "tracking.run_id": f"run{i}", "quantization._target_": f"q.{quantization}"}
        trials.append((params, metrics))
    log_sweep(client, experiment, "grid", trials)
    table.main(["grid", "--uri", uri, "--no-plots", "--no-log"])
    (header, *_) = [list(row) for row in body(capsys.readouterr().out)]
    assert "train.finetune_lr" in header and "quant" in header and "bits" in header
    assert "tracking.run_id" not in header and "quantization._target_" not in header
    assert header.count("quant") == 1  # a swept key that is also a method column appears once
