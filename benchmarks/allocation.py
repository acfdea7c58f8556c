"""Per-layer allocation against the uniform grid: the searched front of per-layer sparsity x bits against model-wide
sparsity x bits at the same number of trials, on the cnn / mnist5k (issue 23).

    .venv/bin/python benchmarks/allocation.py                 # 16 grid points, 16 search trials, ~12 min
    .venv/bin/python benchmarks/allocation.py --seeds 0 1 2   # the search at three sampler seeds

The grid: pruning=layer_magnitude at pruning.amount 0, .5, .75, .9 in every layer x quantization=fake_quant at
bits_w 2, 4, 8, 16 in every layer (16 points). The search: sweeps/allocation_cnn_mnist5k.yaml (NSGA-II over each of
the cnn's 4 layers' sparsity and bits, the same values: layer_bits 32 left out, as the grid cannot take it) with
n_trials = the grid's points, population 4, its first trials the sensitivity allocations for 0.25 and 0.125 x the
fp32 size (study.allocations). Both sides train at train.epochs / finetune_epochs given here (the sweep file's 20 /
4 would take an hour), share one cache directory (one baseline, trained by the grid, which the search loads: its wall
time has no baseline in it), and log to MLflow stores of their own.

Printed and written to results/allocation.csv, each side's: trials, hypervolume over top1 (max) x
size_theoretical_mb (min) against one reference for both (the worst value of each over every trial of either side),
its ratio to the grid's, the best top1 inside 0.25 x the fp32 model's size_theoretical_mb, and wall time; and the
sensitivity allocations' own trials (what a one-shot allocator, HAWQ's kind, would have returned).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend
from timed_sweep import ROOT, pqsweep, read_trials, table

from pqsweep import measure, models
from pqsweep.reports.pareto import hypervolume, parse_objectives, reference_point

OBJECTIVES = parse_objectives("top1,size_theoretical_mb", default=[])
AMOUNTS, BITS = [0.0, 0.5, 0.75, 0.9], [2, 4, 8, 16]
BUDGET = 0.25  # x the fp32 model's size_theoretical_mb


def seeded_numbers(work: Path, study: str) -> set[int]:
    """The trial numbers of the study's enqueued sensitivity allocations."""
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(work / "optuna.journal")))
    trials = optuna.load_study(study_name=study, storage=storage).trials
    return {t.number for t in trials if "pqsweep.allocation" in t.user_attrs}


def best_within(rows: list[dict], limit: float) -> float:
    inside = [r["top1"] for r in rows if r["size_theoretical_mb"] <= limit]
    return max(inside, default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="NSGA-II seeds of the search")
    parser.add_argument("--epochs", type=int, default=3, help="train.epochs (the sweep file: 20)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="train.finetune_epochs (the sweep file: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--csv", default=str(ROOT / "results" / "allocation.csv"))
    args = parser.parse_args()
    n = len(AMOUNTS) * len(BITS)
    common = [f"train.epochs={args.epochs}", f"train.finetune_epochs={args.finetune_epochs}",
              "study.objectives=[top1,size_theoretical_mb]", "measure.warmup=2", "measure.repeats=5"]
    fp32 = measure.sizes(models.small_cnn(10, 1))["size_theoretical_mb"]  # mnist5k: 1 channel, 10 classes
    limit = BUDGET * fp32

    sides = []  # (name, seconds, rows, seeded rows)
    with tempfile.TemporaryDirectory(prefix="pqsweep-allocation-") as tmp:
        cache = Path(tmp) / "cache"
        grid = ["experiment=mnist_cnn", "pruning=layer_magnitude", "quantization=fake_quant",
                f"pruning.amount={','.join(map(str, AMOUNTS))}", f"quantization.bits_w={','.join(map(str, BITS))}",
                "study.name=uniform_grid", *common]
        seconds = pqsweep(grid, Path(tmp) / "grid", cache, args.threads)
        rows = [t.metrics for t in read_trials(Path(tmp) / "grid" / "mlflow.db")]
        assert len(rows) == n, f"the grid finished {len(rows)} of {n} points"
        sides.append(("uniform grid", seconds, rows, []))
        print(f"uniform grid: {len(rows)} trials, {seconds:.0f} s", flush=True)
        for seed in args.seeds:
            work = Path(tmp) / f"search-{seed}"
            search = ["sweep=allocation_cnn_mnist5k", f"hydra.sweeper.n_trials={n}",
                      f"hydra.sweeper.sampler.seed={seed}", "hydra.sweeper.sampler.population_size=4",
                      f"quantization.layer_bits=choice({','.join(map(str, BITS))})",
                      f"study.allocations=[{BUDGET},{BUDGET / 2}]", *common]
            seconds = pqsweep(search, work, cache, args.threads)
            trials = read_trials(work / "mlflow.db")
            seeded = seeded_numbers(work, "allocation_cnn_mnist5k")
            rows = [t.metrics for t in trials]
            first = [t.metrics for t in trials if int(t.tags["optuna_trial_number"]) in seeded]
            sides.append((f"per-layer search (seed {seed})", seconds, rows, first))
            print(f"per-layer search seed {seed}: {len(rows)} trials ({len(first)} sensitivity allocations), "
                  f"{seconds:.0f} s", flush=True)

    everything = [r for _, _, rows, _ in sides for r in rows]
    reference, where = reference_point(OBJECTIVES, None, everything)

    def volume(rows: list[dict]) -> float:
        return hypervolume([[r.get(o.name) for o in OBJECTIVES] for r in rows], OBJECTIVES, reference)

    grid_hv, grid_seconds = volume(sides[0][2]), sides[0][1]
    header = ["side", "trials", "hypervolume", "HV / grid HV", f"best top1 at size <= {BUDGET} x fp32 (%)",
              "wall (s)", "wall / grid"]
    rows = []
    for name, seconds, found, first in sides:
        rows.append([name, str(len(found)), f"{volume(found):.6g}", f"{volume(found) / grid_hv:.3f}",
                     f"{best_within(found, limit):.2f}", f"{seconds:.0f}", f"{seconds / grid_seconds:.2f}"])
        if first:
            rows.append([f"  its sensitivity allocations alone", str(len(first)), f"{volume(first):.6g}",
                         f"{volume(first) / grid_hv:.3f}", f"{best_within(first, limit):.2f}", "", ""])
    print(table(header, rows))
    print(f"{where}; fp32 size_theoretical_mb {fp32:.6f}, budget {limit:.6f} MB; baseline top1 "
          f"{everything[0].get('baseline_top1', float('nan')):.2f} %. train.epochs={args.epochs} "
          f"train.finetune_epochs={args.finetune_epochs}, {args.threads} torch thread(s).")
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


if __name__ == "__main__":
    main()
