"""Framework cost: the `make run` grid through pqsweep against the same work in plain PyTorch (plain_grid.py).

    .venv/bin/python benchmarks/framework.py                                  # 5 baseline epochs, 1 fine-tuning
    .venv/bin/python benchmarks/framework.py --epochs 20 --finetune-epochs 4 --rounds 2 \
        --csv results/framework_make_run.csv                                  # the make run settings (~3 min)
    .venv/bin/python benchmarks/framework.py --rounds 1                       # plain, then pqsweep, once

Each side is one fresh process: `pqsweep -m sweep=mnist_cnn_sparsity_x_precision train.epochs=E
train.finetune_epochs=F` in a new directory (new MLflow store, study and cache: nothing cached), and
`benchmarks/plain_grid.py --epochs E --finetune-epochs F`, which trains one baseline, fine-tunes once per non-zero
sparsity and measures the baseline once, as pqsweep's caches should make it do. Both wall times include the
interpreter's start and imports. The default (5 and 1 epochs) keeps `make bench` short; since the work shrinks and
the framework's cost does not, it is the less flattering ratio. The sides alternate for `--rounds` rounds (default
3: plain, pqsweep, pqsweep, plain, plain, pqsweep) and the table gives medians; both run at `--threads` torch
threads (default 1, see timed_sweep.py). The table also counts what pqsweep computed (from its trials' MLflow tags
and its log) and checks that every grid point's top-1 equals the plain script's: the same work, not just as much.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timed_sweep import ROOT, pinned, run_sweep, table, timed


def plain(epochs: int, finetune_epochs: int, work: Path, threads: int) -> tuple[float, float, list[dict]]:
    """(wall seconds, CPU seconds, its rows) of one plain_grid.py process."""
    work.mkdir(parents=True)
    out = work / "rows.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "plain_grid.py"), "--epochs", str(epochs),
               "--finetune-epochs", str(finetune_epochs), "--json", str(out)]
    seconds, cpu_seconds, done = timed(command, cwd=work, env=pinned(threads), stdout=subprocess.DEVNULL)
    done.check_returncode()
    return seconds, cpu_seconds, json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="train.epochs on both sides (make run: 20)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="train.finetune_epochs (make run: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating (ABBA...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides (OMP_NUM_THREADS)")
    parser.add_argument("--csv", default=str(ROOT / "results" / "framework.csv"))
    args = parser.parse_args()
    overrides = ["sweep=mnist_cnn_sparsity_x_precision", f"train.epochs={args.epochs}",
                 f"train.finetune_epochs={args.finetune_epochs}"]

    times = {"plain": [], "pqsweep": []}
    cpu = {"plain": [], "pqsweep": []}
    with tempfile.TemporaryDirectory(prefix="pqsweep-framework-") as tmp:
        for round_ in range(args.rounds):
            for side in ("plain", "pqsweep") if round_ % 2 == 0 else ("pqsweep", "plain"):
                work = Path(tmp) / f"{side}-{round_}"
                if side == "plain":
                    seconds, cpu_seconds, rows = plain(args.epochs, args.finetune_epochs, work, args.threads)
                else:
                    sweep = run_sweep(overrides, work, args.threads)
                    seconds, cpu_seconds = sweep.seconds, sweep.cpu_seconds
                times[side].append(seconds)
                cpu[side].append(cpu_seconds)
                print(f"round {round_ + 1}: {side} {seconds:.1f} s ({cpu_seconds:.1f} s CPU)", flush=True)

    plain_s, pqsweep_s = statistics.median(times["plain"]), statistics.median(times["pqsweep"])
    plain_cpu, pqsweep_cpu = statistics.median(cpu["plain"]), statistics.median(cpu["pqsweep"])
    points = {(r["amount"], r["quantization"]): r for r in rows if r["amount"] is not None}
    same_top1 = sum(abs(t.metrics["top1"] - points[t.amount, t.quantization]["top1"]) < 1e-9 for t in sweep.trials)
    size_gap = max(abs(t.metrics["size_mb"] - points[t.amount, t.quantization]["size_mb"]) for t in sweep.trials)
    n = len(sweep.trials)
    header = ["", "plain", "pqsweep", "pqsweep / plain"]
    body = [
        [f"wall time, {n} grid points (s)", f"{plain_s:.1f}", f"{pqsweep_s:.1f}", f"{pqsweep_s / plain_s:.3f}"],
        ["CPU time, user + system (s)", f"{plain_cpu:.1f}", f"{pqsweep_cpu:.1f}", f"{pqsweep_cpu / plain_cpu:.3f}"],
        ["wall time per grid point (s)", f"{plain_s / n:.2f}", f"{pqsweep_s / n:.2f}", ""],
        ["baseline trainings (tags / log)", "1", f"{sweep.baseline_trainings} / {sweep.logged_trainings}", ""],
        ["fine-tunes (tags / log)", str(sum(a > 0 for a, q in points if q == "none")),
         f"{sweep.finetunes} / {sweep.logged_finetunes}", ""],
        ["baseline measurements (tags)", "1", str(sweep.baseline_measurements), ""],
        ["grid points with the same top-1", "", f"{same_top1}/{n}", ""],
        ["largest size_mb difference (MB)", "", f"{size_gap:.5f}", ""],
    ]
    print(table(header, body))
    print(f"train.epochs={args.epochs} train.finetune_epochs={args.finetune_epochs}, {args.threads} torch thread(s); "
          f"{'medians of ' + str(args.rounds) + ' alternating runs' if args.rounds > 1 else 'one run of each'}, "
          f"plain first; target pqsweep / plain <= 1.15 "
          f"({'met' if pqsweep_s / plain_s <= 1.15 else 'missed'}); {os.cpu_count()} CPUs")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        csv.writer(f).writerows([["measure", "plain", "pqsweep", "pqsweep / plain"], *body,
                                 ["settings", f"train.epochs={args.epochs}",
                                  f"train.finetune_epochs={args.finetune_epochs}",
                                  f"rounds={args.rounds} threads={args.threads}"]])


if __name__ == "__main__":
    main()
