"""Per-trial overhead: what a trial costs when it computes nothing, against a typical trial of the `make run` grid.

    .venv/bin/python benchmarks/overhead.py                  # 20 empty trials, the 18-point grid at 1 + 1 epochs
    .venv/bin/python benchmarks/overhead.py --trials 40 --epochs 2 --finetune-epochs 1
    .venv/bin/python benchmarks/overhead.py --async-logging  # the empty sweep with MLflow's async logging, and without

Both are sequential `pqsweep -m` sweeps (basic launcher, trials in one process), each in a fresh directory. The
empty sweep is as close to nothing as the config allows: `dataset=digits` (embedded, 360 test images, cached after
the first trial), `train.epochs=0` (the untrained net is the baseline), `pruning=none` (nothing removed, so no
fine-tuning), `quantization=none`, `measure.warmup=0 measure.repeats=2 measure.top5=false`; its grid is
`train.finetune_lr` over `--trials` values, a key that changes no work here. The typical sweep is
`sweep=mnist_cnn_sparsity_x_precision` with `train.epochs` and `train.finetune_epochs` cut to `--epochs` and
`--finetune-epochs`. A trial's time is the interval between Hydra's launch lines of consecutive trials (its log
has milliseconds), so it holds everything a trial costs: the sweeper's bookkeeping (Optuna ask and tell, the trial's
MLflow run), Hydra's composition of the job's config, the task and its logging. The first trial of each sweep
(torch imported, the data parsed, the baseline trained) is left out. The empty trial's time is split at pqsweep's
own log lines: launch -> "baseline ... loaded" (composition, job set-up, MLflow set-up, params and config logged,
data and model), -> "run ... top1" (the pipeline, metrics and tags logged), -> the next launch (Hydra's job
teardown, the sweeper's tell, ask and next run).

`--async-logging` runs the empty sweep four times instead, alternately without and with MLflow's asynchronous
logging (MLFLOW_ENABLE_ASYNC_LOGGING=true: fluent log_* calls queue and return; the run waits for the queue when it
ends), and prints the median trial of each and their ratio, into results/overhead_async.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from timed_sweep import ROOT, Sweep, run_sweep, table

_STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]"
_BASELINE = re.compile(_STAMP + r"\[pqsweep\.pipeline\]\[INFO\] - baseline \w+: ", re.M)
_DONE = re.compile(_STAMP + r"\[pqsweep\.tracking\]\[INFO\] - run \w+: top1 ", re.M)


def stamps(pattern: re.Pattern, log: str) -> list[float]:
    return sorted(datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in pattern.findall(log))


def intervals(sweep: Sweep) -> list[float]:
    """Seconds from each trial's launch to the next one's, the first trial left out."""
    launches = sweep.launch_times()
    return [b - a for a, b in zip(launches[1:], launches[2:])]


def phases(sweep: Sweep) -> list[float]:
    """Median seconds of the three parts of a trial (see the module docstring), the first trial left out."""
    launches, baselines, done = sweep.launch_times(), stamps(_BASELINE, sweep.log), stamps(_DONE, sweep.log)
    rows = [(b - a, d - b, n - d) for a, b, d, n in zip(launches[1:], baselines[1:], done[1:], launches[2:])]
    return [statistics.median(part) for part in zip(*rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of the empty sweep")
    parser.add_argument("--epochs", type=int, default=1, help="train.epochs of the typical sweep (make run: 20)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="train.finetune_epochs (make run: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--async-logging", action="store_true", help="compare the empty sweep with async logging")
    parser.add_argument("--csv", default=None, help="default: results/overhead.csv (overhead_async.csv)")
    args = parser.parse_args()
    rates = ",".join(f"{(i + 1) * 1e-4:.4g}" for i in range(args.trials))
    empty_overrides = ["dataset=digits", "train.epochs=0", "pruning=none", "quantization=none", "measure.warmup=0",
                       "measure.repeats=2", "measure.top5=false", f"train.finetune_lr={rates}"]
    if args.async_logging:
        return compare_async(empty_overrides, args)
    args.csv = args.csv or str(ROOT / "results" / "overhead.csv")
    typical_overrides = ["sweep=mnist_cnn_sparsity_x_precision", f"train.epochs={args.epochs}",
                         f"train.finetune_epochs={args.finetune_epochs}"]

    with tempfile.TemporaryDirectory(prefix="pqsweep-overhead-") as tmp:
        empty = run_sweep(empty_overrides, Path(tmp) / "empty", args.threads)
        print(f"empty sweep: {len(empty.trials)} trials, {empty.seconds:.1f} s", flush=True)
        typical = run_sweep(typical_overrides, Path(tmp) / "typical", args.threads)
        print(f"typical sweep: {len(typical.trials)} trials, {typical.seconds:.1f} s", flush=True)

    e, t = intervals(empty), intervals(typical)
    empty_median, typical_mean = statistics.median(e), statistics.mean(t)
    to_run, pipeline, between = phases(empty)
    header = ["trial", "trials timed", "median (s)", "mean (s)", "min (s)", "max (s)"]
    body = [
        ["empty (overhead)", str(len(e)), f"{empty_median:.3f}", f"{statistics.mean(e):.3f}", f"{min(e):.3f}",
         f"{max(e):.3f}"],
        ["  launch -> pipeline starts", "", f"{to_run:.3f}", "", "", ""],
        ["  pipeline, metrics and tags", "", f"{pipeline:.3f}", "", "", ""],
        ["  job end -> next launch", "", f"{between:.3f}", "", "", ""],
        ["typical (make run grid)", str(len(t)), f"{statistics.median(t):.3f}", f"{typical_mean:.3f}",
         f"{min(t):.3f}", f"{max(t):.3f}"],
        ["empty / typical", "", f"{empty_median / statistics.median(t):.3f}",
         f"{statistics.mean(e) / typical_mean:.3f}", "", ""],
    ]
    print(table(header, body))
    print(f"typical: train.epochs={args.epochs} train.finetune_epochs={args.finetune_epochs}; target: empty trial "
          f"<= 0.5 s ({'met' if empty_median <= 0.5 else 'missed'}); {os.cpu_count()} CPUs")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        csv.writer(f).writerows([header, *body, ["settings", f"trials={args.trials}", f"train.epochs={args.epochs}",
                                                 f"train.finetune_epochs={args.finetune_epochs}", "", ""]])


def compare_async(overrides: list[str], args) -> None:
    """The empty sweep without, with, without and with async logging; the median trial of each mode."""
    modes = {"sync": {"MLFLOW_ENABLE_ASYNC_LOGGING": "false"}, "async": {"MLFLOW_ENABLE_ASYNC_LOGGING": "true"}}
    timed = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="pqsweep-overhead-") as tmp:
        for turn in range(2):  # alternated, so that the shared machine's drift falls on both
            for mode, env in modes.items():
                sweep = run_sweep(overrides, Path(tmp) / f"{mode}{turn}", args.threads, env)
                timed[mode] += intervals(sweep)
                print(f"{mode} {turn}: {len(sweep.trials)} trials, {sweep.seconds:.1f} s", flush=True)
    header = ["empty trial", "trials timed", "median (s)", "mean (s)", "min (s)", "max (s)"]
    body = [[mode, str(len(t)), f"{statistics.median(t):.3f}", f"{statistics.mean(t):.3f}", f"{min(t):.3f}",
             f"{max(t):.3f}"] for mode, t in timed.items()]
    ratio = statistics.median(timed["async"]) / statistics.median(timed["sync"])
    mean_ratio = statistics.mean(timed["async"]) / statistics.mean(timed["sync"])
    body.append(["async / sync", "", f"{ratio:.3f}", f"{mean_ratio:.3f}", "", ""])
    print(table(header, body))
    print(f"{os.cpu_count()} CPUs; trials={args.trials} per sweep, 2 sweeps per mode, first trial of each left out")
    path = Path(args.csv or ROOT / "results" / "overhead_async.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *body, ["settings", f"trials={args.trials}", "", "", "", ""]])


if __name__ == "__main__":
    main()
