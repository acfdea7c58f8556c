"""Speed where it runs: a small study measured in every runtime (`measure.runtimes`), and what its front's speed-ups
become outside eager PyTorch.

    .venv/bin/python benchmarks/runtimes.py            # cnn on mnist5k, 17 points x 4 runtimes: 425 s here
    .venv/bin/python benchmarks/runtimes.py --quick    # 11 points, 1 epoch, 20 repeats: 420 s beside a test run

Two grid sweeps, each in a fresh directory of its own (MLflow store, cache, so each trains and measures its own
baseline, the same weights: same seed and data), at one torch thread (see timed_sweep.py) and `measure.runtimes=[eager,torchscript,onnxruntime,compile]`:
- pruning=global_magnitude at amounts 0.7, 0.95 (--quick: 0.95) x quantization none | fp16 | static_int8 |
  dynamic_int8 | fake_quant | sparse (CSR storage: it needs the zeros unstructured pruning leaves);
- pruning=l1_filter (whole filters removed: fewer MACs) at 0.5 x the same quantizations but sparse.
Sized for the shared 2-core machine (load average 9-12 while it ran): 17 points at 100 repeats took 7 min.
Each trial's latency is batch-1 p50 over measure.repeats calls in each runtime; each speed-up is its sweep's baseline
p50 in that runtime (measured in the same process, the baseline_metrics stage) / the trial's: ratios measured in
one run, never across runs. The front is over (top1 max, size_mb min, latency_ms_p50 min) with eager latency; a
front point "keeps its place" in a runtime when it is still non-dominated after every trial's latency_ms_p50 is
replaced by that runtime's (a trial the runtime cannot run has no latency there and no place on its front).
Prints, per runtime, the front's speed-ups (median, range, how many are <= 1x, how many n/a) and how many front points
keep their place; per quantization, the median speed-up in each runtime over all its trials; writes every trial to
results/runtimes.csv (--quick: results/runtimes_quick.csv).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from timed_sweep import ROOT, run_sweep, table

from pqsweep.reports import speedups
from pqsweep.reports.pareto import pareto_front, parse_objectives
from pqsweep.runtimes import EAGER, EXTRA, RUNTIMES, p50, tag

OBJECTIVES = parse_objectives("top1,size_mb,latency_ms_p50", default=[])
QUANTIZATIONS = ["none", "fp16", "static_int8", "dynamic_int8", "fake_quant", "sparse"]
GRIDS = {  # name: (pruning, amounts, quantizations)
    "full": [("global_magnitude", [0.7, 0.95], QUANTIZATIONS), ("l1_filter", [0.5], QUANTIZATIONS[:-1])],
    "quick": [("global_magnitude", [0.95], QUANTIZATIONS), ("l1_filter", [0.5], QUANTIZATIONS[:-1])],
}


def baseline_of(db: Path) -> tuple[dict[str, float], dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.stage = 'baseline'")
    return run.data.metrics, run.data.tags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="11 points, 1 epoch, 20 repeats (unless given)")
    parser.add_argument("--epochs", type=int, help="train.epochs (default 3, --quick 1; the mnist_cnn experiment: 20)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="train.finetune_epochs (the experiment: 4)")
    parser.add_argument("--repeats", type=int, help="measure.repeats in every runtime (default 100, --quick 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) and measure.threads")
    parser.add_argument("--csv", help="default results/runtimes.csv (--quick: results/runtimes_quick.csv)")
    args = parser.parse_args()
    args.epochs = args.epochs or (1 if args.quick else 3)
    args.repeats = args.repeats or (20 if args.quick else 100)
    common = ["experiment=mnist_cnn", f"train.epochs={args.epochs}", f"train.finetune_epochs={args.finetune_epochs}",
              f"measure.repeats={args.repeats}", f"measure.threads={args.threads}",
              f"measure.runtimes=[{','.join(RUNTIMES)}]", f"study.objectives=[{','.join(o.name for o in OBJECTIVES)}]"]

    trials, seconds = [], 0.0
    with tempfile.TemporaryDirectory(prefix="pqsweep-runtimes-") as tmp:
        work = Path(tmp)
        for i, (pruning, amounts, quantizations) in enumerate(GRIDS["quick" if args.quick else "full"]):
            sweep = run_sweep([*common, f"study.name=runtimes_{pruning}", f"pruning={pruning}",
                               f"pruning.amount={','.join(map(str, amounts))}",
                               f"quantization={','.join(quantizations)}"], work / f"sweep{i}", args.threads)
            print(f"{pruning}: {len(sweep.trials)} trials, {sweep.seconds:.0f} s", flush=True)
            base = baseline_of(work / f"sweep{i}" / "mlflow.db")  # each sweep's own, measured in its own process
            trials += [(pruning, t, base) for t in sweep.trials]
            seconds += sweep.seconds

    rows = [t.metrics for _, t, _ in trials]
    front = pareto_front([[r.get(o.name) for o in OBJECTIVES] for r in rows], OBJECTIVES)
    speed = [{r: speedups.speedup(t.metrics, t.tags, *base, r) for r in RUNTIMES} for _, t, base in trials]
    base_metrics, base_tags = trials[0][2]  # the first sweep's baseline, for its provider and p50 below

    summary = []
    for runtime in RUNTIMES:
        on_front = [s[runtime] for s, f in zip(speed, front) if f]
        values = sorted(v for v, _ in on_front if v is not None)
        kept = "-" if runtime == EAGER else "{}/{}".format(*speedups.kept(rows, OBJECTIVES, runtime))
        flagged = sum(bool(speedups.flags(s[EAGER][0], {runtime: s[runtime][0]})) for s, f in zip(speed, front) if f)
        summary.append([runtime, base_tags.get(tag(runtime), "?")[:60], f"{base_metrics.get(p50(runtime), 0):.4f}",
                        f"{statistics.median(values):.2f}x" if values else "-",
                        f"{values[0]:.2f}-{values[-1]:.2f}" if values else "-",
                        str(sum(v <= 1.0 for v in values)), str(len(on_front) - len(values)),
                        "-" if runtime == EAGER else str(flagged), kept])
    print(f"front over {', '.join(o.name for o in OBJECTIVES)} (eager latency): {sum(front)} of {len(rows)} trials")
    print(table(["runtime", "provider (baseline's run)", "baseline p50 ms", "front: median speed-up", "range",
                 "<= 1x", "n/a", "flagged", "front kept"], summary))

    by_quantization = []
    for quantization in QUANTIZATIONS:
        mine = [s for (_, t, _), s in zip(trials, speed) if t.quantization == quantization]
        cells = []
        for runtime in RUNTIMES:
            values = [s[runtime][0] for s in mine if s[runtime][0] is not None]
            cells.append(f"{statistics.median(values):.2f}x" if values else
                         "n/a: " + next((why for s in mine if (why := s[runtime][1])), "?")[:30])
        by_quantization.append([quantization, str(len(mine)), *cells])
    print("median speed-up over all trials of each quantization, per runtime (baseline p50 / trial p50, same runtime)")
    print(table(["quantization", "trials", *RUNTIMES], by_quantization))
    print(f"{len(rows)} trials in {seconds:.0f} s; train.epochs={args.epochs} train.finetune_epochs="
          f"{args.finetune_epochs}, measure.repeats={args.repeats}, {args.threads} torch thread(s); "
          f"{'quick' if args.quick else 'full'} grid")

    header = ["pruning", "amount", "quantization", "top1", "size_mb", "macs_ratio", "front",
              *(f"latency_ms_p50_{r}" for r in RUNTIMES), *(f"speedup_{r}" for r in RUNTIMES), "flags",
              *(f"n/a_{r}" for r in EXTRA)]
    lines = []
    for (pruning, t, (base_metrics, _)), s, f in zip(trials, speed, front):
        m = t.metrics
        marks = speedups.flags(s[EAGER][0], {r: s[r][0] for r in EXTRA})
        lines.append([pruning, t.amount, t.quantization, m.get("top1"), m.get("size_mb"),
                      base_metrics["macs"] / m["macs"], int(f), *(m.get(p50(r), "") for r in RUNTIMES),
                      *("" if s[r][0] is None else round(s[r][0], 4) for r in RUNTIMES), "; ".join(marks),
                      *(s[r][1] or "" for r in EXTRA)])
    path = Path(args.csv or ROOT / "results" / f"runtimes{'_quick' if args.quick else ''}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *lines])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
