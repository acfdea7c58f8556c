"""Growth: what a sparsity x precision grid costs as it grows; the prune stage cache keeps one fine-tune per sparsity.

    .venv/bin/python benchmarks/growth.py                                  # 6x3, 6x6, 12x3 at 1 + 1 epochs, twice
    .venv/bin/python benchmarks/growth.py --epochs 2 --finetune-epochs 2

Each grid is one `pqsweep -m experiment=mnist_cnn pruning.amount=... quantization=...` (the `make run` experiment:
cnn on mnist5k, global magnitude) in a fresh directory, so it trains its own baseline. Precisions are
none, fp16, static_int8 (the `make run` three) or those and bf16, dynamic_int8, weight_only_int8; sparsities are
`make run`'s six or twelve from 0 to 0.99. A grid should train 1 baseline and fine-tune once per non-zero sparsity,
not once per grid point: the counts come from the trials' MLflow tags and, independently, from the log. Doubling
the precisions adds only quantization and measurement; doubling the sparsities adds fine-tunes too. Each grid runs
`--rounds` times, the order rotating (6x3, 6x6, 12x3; then 6x6, 12x3, 6x3; ...), and the table gives medians of wall
and CPU time; one torch thread (`--threads`, see timed_sweep.py).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
from pathlib import Path

from timed_sweep import ROOT, Sweep, run_sweep, table

SPARSITIES = {6: [0, 0.5, 0.75, 0.9, 0.95, 0.99], 12: [0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99]}
PRECISIONS = {3: ["none", "fp16", "static_int8"],
              6: ["none", "fp16", "bf16", "static_int8", "dynamic_int8", "weight_only_int8"]}
GRIDS = [(6, 3), (6, 6), (12, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="train.epochs (make run: 20)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="train.finetune_epochs (make run: 4)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each grid; the order rotates each round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--csv", default=str(ROOT / "results" / "growth.csv"))
    args = parser.parse_args()

    runs: dict[tuple[int, int], list[Sweep]] = {grid: [] for grid in GRIDS}
    with tempfile.TemporaryDirectory(prefix="pqsweep-growth-") as tmp:
        for round_ in range(args.rounds):
            for s, p in GRIDS[round_ % len(GRIDS):] + GRIDS[:round_ % len(GRIDS)]:
                overrides = ["experiment=mnist_cnn", f"pruning.amount={','.join(map(str, SPARSITIES[s]))}",
                             f"quantization={','.join(PRECISIONS[p])}", f"train.epochs={args.epochs}",
                             f"train.finetune_epochs={args.finetune_epochs}"]
                sweep = run_sweep(overrides, Path(tmp) / f"grid-{s}x{p}-{round_}", args.threads)
                runs[s, p].append(sweep)
                print(f"round {round_ + 1}: {s}x{p}: {len(sweep.trials)} trials, {sweep.seconds:.1f} s "
                      f"({sweep.cpu_seconds:.1f} s CPU)", flush=True)

    wall = {grid: statistics.median(r.seconds for r in sweeps) for grid, sweeps in runs.items()}
    cpu = {grid: statistics.median(r.cpu_seconds for r in sweeps) for grid, sweeps in runs.items()}
    small = GRIDS[0]
    header = ["grid", "trials", "fine-tunes (tags / log)", "expected", "baseline trainings (tags / log)",
              "wall (s)", "CPU (s)", "wall / 6x3", "CPU / 6x3", "trials / 6x3"]
    body = []
    for (s, p), sweeps in runs.items():
        counts = {(r.finetunes, r.logged_finetunes, r.baseline_trainings, r.logged_trainings) for r in sweeps}
        finetunes, logged_finetunes, trainings, logged_trainings = max(counts)  # one tuple unless a round differed
        body.append([f"{s}x{p}", str(len(sweeps[0].trials)), f"{finetunes} / {logged_finetunes}"
                     + ("" if len(counts) == 1 else " (rounds differ)"), str(sum(a > 0 for a in SPARSITIES[s])),
                     f"{trainings} / {logged_trainings}", f"{wall[s, p]:.1f}", f"{cpu[s, p]:.1f}",
                     f"{wall[s, p] / wall[small]:.2f}", f"{cpu[s, p] / cpu[small]:.2f}",
                     f"{len(sweeps[0].trials) / len(runs[small][0].trials):.2f}"])
    print(table(header, body))
    print(f"train.epochs={args.epochs} train.finetune_epochs={args.finetune_epochs}, {args.threads} torch thread(s); "
          f"medians of {args.rounds} rounds, the order rotating; {os.cpu_count()} CPUs")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        csv.writer(f).writerows([header, *body])


if __name__ == "__main__":
    main()
