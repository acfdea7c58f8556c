"""`pqsweep-report`: read a sweep back from MLflow and print its table (and optionally write it as CSV).

    pqsweep-report mnist_cnn_sparsity_x_precision
    pqsweep-report mnist_cnn_sparsity_x_precision --uri sqlite:///mlflow.db --csv results/table.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pqsweep.tracking import resolve_uri

# (header, source, format): source is "params.<key>", "metrics.<key>" or "tags.<key>"
COLUMNS = [
    ("pruning", "params.pruning", "{}"),
    ("amount", "params.pruning.amount", "{}"),
    ("sparsity", "metrics.sparsity", "{:.3f}"),
    ("quant", "params.quantization", "{}"),
    ("bits", "params.quantization.bits", "{}"),
    ("top1 %", "metrics.top1", "{:.2f}"),
    ("Δ top1", "metrics.top1_delta", "{:+.2f}"),
    ("size MB", "metrics.size_mb", "{:.4f}"),
    ("gzip MB", "metrics.size_gzip_mb", "{:.4f}"),
    ("sparse MB", "metrics.size_sparse_mb", "{:.4f}"),
    ("reduction", "metrics.reduction_factor", "{:.2f}x"),
    ("gzip red.", "metrics.reduction_factor_gzip", "{:.2f}x"),
    ("p50 ms", "metrics.latency_ms_p50", "{:.3f}"),
    ("status", "info.status", "{}"),
]


@dataclass
class Sweep:
    parent: Run
    trials: list[Run]
    baseline: Run | None


def value(run: Run, source: str):
    kind, key = source.split(".", 1)
    if kind == "info":
        return getattr(run.info, key)
    return getattr(run.data, kind).get(key)


def load_sweep(name: str, experiment: str) -> Sweep:
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"pqsweep-report: no experiment {experiment!r} at {mlflow.get_tracking_uri()}")
    parents = client.search_runs(
        [exp.experiment_id], f"tags.stage = 'sweep' and tags.sweep = '{name}'", order_by=["start_time DESC"], max_results=1
    )
    if not parents:
        raise SystemExit(f"pqsweep-report: no sweep {name!r} in experiment {experiment!r} at {mlflow.get_tracking_uri()}")
    parent = parents[0]
    trials = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=5000)
    trials.sort(key=lambda r: (float(r.data.params.get("pruning.amount", 0)), -int(r.data.params.get("quantization.bits", 32)), r.data.params.get("quantization", "")))
    hashes = {r.data.tags.get("baseline_hash") for r in trials} - {None}
    baseline = None
    if len(hashes) == 1:
        found = client.search_runs([exp.experiment_id], f"tags.stage = 'baseline' and tags.baseline_hash = '{hashes.pop()}'", max_results=1)
        baseline = found[0] if found else None
    return Sweep(parent, trials, baseline)


def rows(sweep: Sweep) -> list[list[str]]:
    out = []
    for run in sweep.trials:
        row = []
        for _, source, fmt in COLUMNS:
            v = value(run, source)
            row.append("-" if v is None else fmt.format(v))
        out.append(row)
    return out


def render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pqsweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="the sweep's name (study.name, e.g. mnist_cnn_sparsity_x_precision)")
    parser.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    parser.add_argument("--experiment", default="pqsweep", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    mlflow.set_tracking_uri(resolve_uri(args.uri))
    sweep = load_sweep(args.sweep, args.experiment)
    header = [h for h, _, _ in COLUMNS]
    body = rows(sweep)
    print(f"sweep {args.sweep}: {len(sweep.trials)} trials under MLflow run {sweep.parent.info.run_id}")
    if sweep.baseline is not None:
        b = sweep.baseline.data.metrics
        print(f"baseline (fp32, dense): top1 {b['top1']:.2f}%, size {b['size_mb']:.4f} MB, "
              f"gzip {b['size_gzip_mb']:.4f} MB, p50 {b['latency_ms_p50']:.3f} ms")
    print(render(header, body))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(body)
    failed = sum(r.info.status == "FAILED" for r in sweep.trials)
    if failed:
        print(f"{failed} trial(s) failed: see their `error` tag in MLflow", file=sys.stderr)


if __name__ == "__main__":
    main()
