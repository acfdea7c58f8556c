"""pqsweep-report: every cell of its table is the run's own metric, parameter or status, rows in grid order."""

from __future__ import annotations

import csv

import mlflow
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pqsweep.reports import table

# Each column and where its cells come from, written out here rather than read from table.METRICS: a column that
# reads the wrong metric must fail. (header, CSV header, kind, key, format)
EXPECTED = [
    ("pruning", "pruning", "params", "pruning", "{}"),
    ("amount", "pruning.amount", "params", "pruning.amount", "{}"),
    ("quant", "quantization", "params", "quantization", "{}"),
    ("bits", "quantization.bits", "params", "quantization.bits", "{}"),
    ("sparsity", "sparsity", "metrics", "sparsity", "{:.3f}"),
    ("top1 %", "top1 (%)", "metrics", "top1", "{:.2f}"),
    ("Δ top1", "top1_delta (pp)", "metrics", "top1_delta", "{:+.2f}"),
    ("size MB", "size_mb (MB)", "metrics", "size_mb", "{:.4f}"),
    ("gzip MB", "size_gzip_mb (MB)", "metrics", "size_gzip_mb", "{:.4f}"),
    ("sparse MB", "size_sparse_mb (MB)", "metrics", "size_sparse_mb", "{:.4f}"),
    ("reduction", "reduction_factor (x)", "metrics", "reduction_factor", "{:.2f}x"),
    ("gzip red.", "reduction_factor_gzip (x)", "metrics", "reduction_factor_gzip", "{:.2f}x"),
    ("p50 ms", "latency_ms_p50 (ms)", "metrics", "latency_ms_p50", "{:.3f}"),
    ("status", "status", "info", "status", "{}"),
]
METRIC_KEYS = [key for _, _, kind, key, _ in EXPECTED if kind == "metrics"]

# Three trials, deliberately logged out of grid order; every metric gets a value no other metric of the same run
# has at the precision it is printed with, so a column that reads another metric shows another number.
TRIALS = [
    {"pruning": "global_magnitude", "pruning.amount": "0.9", "quantization": "static_int8", "quantization.bits": "8"},
    {"pruning": "global_magnitude", "pruning.amount": "0.0", "quantization": "none", "quantization.bits": "32"},
    {"pruning": "global_magnitude", "pruning.amount": "0.0", "quantization": "fp16", "quantization.bits": "16"},
]


def metric_values(trial: int) -> dict[str, float]:
    return {key: round(1.1 * (i + 1) + 0.2345 * trial + 0.0001 * i, 4) for i, key in enumerate(METRIC_KEYS)}


@pytest.fixture
def store(tmp_path):
    """A sweep as `pqsweep -m` logs it: a parent run, its trials as children, and their baseline."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment("pqsweep", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": "grid"}).info.run_id
    for number, params in enumerate(TRIALS):
        tags = {"stage": "trial", "sweep": "grid", "baseline_hash": "b" * 16, "mlflow.parentRunId": parent}
        run = client.create_run(experiment, tags=tags).info.run_id
        client.log_batch(run, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metric_values(number).items()])
        client.set_terminated(run, "FAILED" if number == 2 else "FINISHED")
    baseline = client.create_run(experiment, tags={"stage": "baseline", "baseline_hash": "b" * 16}).info.run_id
    client.log_batch(baseline, metrics=[Metric(k, v, 0, 0) for k, v in
                                        {"top1": 97.25, "size_mb": 0.0766, "size_gzip_mb": 0.0697,
                                         "latency_ms_p50": 0.324}.items()])
    return uri


def test_every_cell_is_its_runs_value(store, tmp_path, capsys):
    # The CSV holds the runs' numbers as logged (units in its header); the markdown holds them formatted.
    table.main(["grid", "--uri", store, "--csv", str(tmp_path / "table.csv"), "--markdown", str(tmp_path / "t.md"),
                "--columns", ",".join(key for _, _, _, key, _ in EXPECTED), "--no-plots", "--out", str(tmp_path / "r")])
    out = capsys.readouterr()
    with open(tmp_path / "table.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == [name for _, name, *_ in EXPECTED]
    md = [[c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "t.md").read_text().splitlines()]
    assert md[0] == [name for name, *_ in EXPECTED]
    # rows in grid order: amount, then precision from high to low
    order = [1, 2, 0]
    assert [(row[1], row[2]) for row in rows] == [(TRIALS[i]["pruning.amount"], TRIALS[i]["quantization"])
                                                  for i in order]
    for row, cells, number in zip(rows, md[2:], order):
        source = {"params": TRIALS[number], "metrics": metric_values(number),
                  "info": {"status": "FAILED" if number == 2 else "FINISHED"}}
        for (name, _, kind, key, fmt), cell, shown in zip(EXPECTED, row, cells):
            expected = source[kind][key]
            assert (float(cell) if kind == "metrics" else cell) == expected, f"CSV column {name!r} of trial {number}"
            assert shown == fmt.format(expected), f"markdown column {name!r} of trial {number}"
    assert "sweep grid: 3 trials under MLflow run" in out.out
    assert "baseline (fp32, dense): top1 97.25%, size 0.0766 MB, gzip 0.0697 MB, p50 0.324 ms" in out.out
    assert "1 trial(s) failed" in out.err
