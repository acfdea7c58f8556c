"""Search against grid: NSGA-II and TPE with a third of the grid's trials, by the hypervolume of what they found.

    .venv/bin/python benchmarks/search_vs_grid.py           # 96-point grid; NSGA-II, TPE: 32 trials x 3 seeds, ~6 min
    .venv/bin/python benchmarks/search_vs_grid.py --quick   # 32-point grid; 10 trials x 2 seeds, ~2.5 min
    .venv/bin/python benchmarks/search_vs_grid.py --samplers nsgaii --population 4 --seeds 0 1 2 3 4

The space is sweeps/mnist_cnn_pareto_nsgaii.yaml's (cnn on mnist5k): pruning global_magnitude | l1_filter, amount
in [0, 0.99], quantization none | fp16 | static_int8 | fake_quant, and fake_quant's bits_w in 2..8. The grid is
that space discretised (amounts 0, .25, .5, .7, .8, .9, .95, .99; bits_w 2, 4, 8), run as two grid sweeps in one
directory, fake_quant with its bits_w and the other methods without: the pre-run check composes each value of a
command-line grid alone, so one grid cannot sweep a key only some options have. The searches are the sweep files
themselves (`sweep=mnist_cnn_pareto_nsgaii|tpe hydra.sweeper.n_trials=N hydra.sweeper.sampler.seed=S`), N =
grid points // 3. Every side is fresh processes in a fresh directory (its own MLflow store, study and cache, so
each trains its own baseline and fine-tunes its own prune stages), at one torch thread (see timed_sweep.py).

Each side's hypervolume is pqsweep.reports.pareto.hypervolume of its finished trials over (top1 max, size_gzip_mb
min, latency_ms_p50 min) against one reference for all sides: the worst value of each objective over every trial of
every side. Latency is the noisy objective on this shared machine (another job's load moves a 0.3 ms call; the
sweep files keep measure.warmup / repeats at 20 / 200), so the table also gives the hypervolume over top1 and size
alone, and the grid measures its noise itself: amount 0 under both pruning methods is the same model, measured twice
per quantization. Searches draw continuous amounts, so
they rarely share a prune stage and fine-tune in nearly every trial; a grid fine-tunes once per (method, amount):
the table gives wall time as well as trials.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from timed_sweep import ROOT, Trial, pqsweep, read_trials, table

from pqsweep.reports.pareto import hypervolume, parse_objectives, reference_point

OBJECTIVES = parse_objectives("top1,size_gzip_mb,latency_ms_p50", default=[])
PRUNINGS = ["global_magnitude", "l1_filter"]
SPACES = {  # (amounts, quantizations without bits, fake_quant's bits_w)
    "full": ([0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99], ["none", "fp16", "static_int8"], [2, 4, 8]),
    "quick": ([0, 0.5, 0.9, 0.99], ["none", "static_int8"], [2, 8]),
}
SAMPLERS = {"nsgaii": "mnist_cnn_pareto_nsgaii", "tpe": "mnist_cnn_pareto_tpe"}


@dataclass
class Side:
    sampler: str
    seed: int | None
    seconds: float
    trials: list[Trial]

    def volume(self, objectives, reference) -> float:
        rows = [[t.metrics.get(o.name) for o in objectives] for t in self.trials]
        return hypervolume(rows, objectives, reference)


def run_grid(space: str, common: list[str], work: Path, threads: int) -> Side:
    amounts, plain, bits = SPACES[space]
    grid = ["experiment=mnist_cnn", f"pruning={','.join(PRUNINGS)}", f"pruning.amount={','.join(map(str, amounts))}",
            f"study.objectives=[{','.join(o.name for o in OBJECTIVES)}]", *common]
    seconds = pqsweep([*grid, f"quantization={','.join(plain)}"], work, work / "cache", threads)
    seconds += pqsweep([*grid, "quantization=fake_quant", f"quantization.bits_w={','.join(map(str, bits))}"],
                       work, work / "cache", threads)
    return Side("grid", None, seconds, read_trials(work / "mlflow.db"))


def run_search(sampler: str, seed: int, n_trials: int, space: str, common: list[str], work: Path, threads: int,
               population: int | None) -> Side:
    overrides = [f"sweep={SAMPLERS[sampler]}", f"hydra.sweeper.n_trials={n_trials}",
                 f"hydra.sweeper.sampler.seed={seed}", *common]
    if space == "quick":  # the quick grid's methods; amounts and bits stay intervals over the same ranges
        overrides.append(f"quantization=choice({','.join(SPACES[space][1] + ['fake_quant'])})")
        population = population or max(4, n_trials // 4)
        if sampler == "tpe":
            overrides.append(f"hydra.sweeper.sampler.n_startup_trials={max(3, n_trials // 4)}")
    if population and sampler == "nsgaii":
        overrides.append(f"hydra.sweeper.sampler.population_size={population}")
    seconds = pqsweep(overrides, work, work / "cache", threads)
    return Side(sampler, seed, seconds, read_trials(work / "mlflow.db"))


def latency_noise(grid: Side) -> float:
    """Median |difference| / mean of latency_ms_p50 between two grid trials of the same model: amount 0 under
    each pruning method (neither removes anything), at each quantization, which give the same top1 and the same
    gzipped bytes."""
    same: dict[tuple, list[float]] = {}
    for t in grid.trials:
        if t.amount == 0:
            key = (t.quantization, t.metrics["top1"], t.metrics["size_gzip_mb"])
            same.setdefault(key, []).append(t.metrics["latency_ms_p50"])
    gaps = [abs(a - b) / ((a + b) / 2) for a, b in (v for v in same.values() if len(v) == 2)]
    return statistics.median(gaps) if gaps else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small space: 32 grid points, 10-trial searches")
    parser.add_argument("--seeds", type=int, nargs="+", help="sampler seeds (default 0 1 2; --quick: 0 1)")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--population", type=int, help="NSGA-II's population_size (default: the sweep file's 8)")
    parser.add_argument("--epochs", type=int, default=3, help="train.epochs (the sweep files: 20)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="train.finetune_epochs (the sweep files: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--csv", help="default results/search_vs_grid.csv (--quick: search_vs_grid_quick.csv)")
    args = parser.parse_args()
    space = "quick" if args.quick else "full"
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    amounts, plain, bits = SPACES[space]
    points = len(PRUNINGS) * len(amounts) * (len(plain) + len(bits))
    n_trials = points // 3
    common = [f"train.epochs={args.epochs}", f"train.finetune_epochs={args.finetune_epochs}"]

    with tempfile.TemporaryDirectory(prefix="pqsweep-search-") as tmp:
        grid = run_grid(space, common, Path(tmp) / "grid", args.threads)
        print(f"grid: {len(grid.trials)} trials, {grid.seconds:.0f} s", flush=True)
        assert len(grid.trials) == points, f"the grid finished {len(grid.trials)} of {points} points"
        searches = []
        for seed in seeds:
            for sampler in args.samplers:
                side = run_search(sampler, seed, n_trials, space, common, Path(tmp) / f"{sampler}-{seed}",
                                  args.threads, args.population)
                searches.append(side)
                print(f"{sampler} seed {seed}: {len(side.trials)} trials, {side.seconds:.0f} s", flush=True)

    sides = [grid, *searches]
    everything = [t.metrics for side in sides for t in side.trials]
    reference, where = reference_point(OBJECTIVES, None, everything)
    two = OBJECTIVES[:2]
    reference_2d, _ = reference_point(two, None, everything)
    grid_hv, grid_hv_2d = grid.volume(OBJECTIVES, reference), grid.volume(two, reference_2d)
    rows = [[s.sampler, "" if s.seed is None else str(s.seed), str(len(s.trials)),
             f"{s.volume(OBJECTIVES, reference):.6g}", f"{s.volume(OBJECTIVES, reference) / grid_hv:.3f}",
             f"{s.volume(two, reference_2d) / grid_hv_2d:.3f}", f"{len(s.trials) / len(grid.trials):.3f}",
             f"{s.seconds:.0f}", f"{s.seconds / grid.seconds:.2f}"] for s in sides]
    header = ["sampler", "seed", "trials", "hypervolume", "HV / grid HV", "HV / grid (top1, size)",
              "trials / grid", "wall (s)", "wall / grid"]
    print(table(header, rows))
    summary = []
    for sampler in args.samplers:
        ratios = sorted(s.volume(OBJECTIVES, reference) / grid_hv for s in searches if s.sampler == sampler)
        ratios_2d = sorted(s.volume(two, reference_2d) / grid_hv_2d for s in searches if s.sampler == sampler)
        summary.append([sampler, str(len(ratios)), f"{statistics.median(ratios):.3f}",
                        f"{ratios[0]:.3f}-{ratios[-1]:.3f}", f"{statistics.median(ratios_2d):.3f}",
                        f"{ratios_2d[0]:.3f}-{ratios_2d[-1]:.3f}", f"{n_trials / len(grid.trials):.3f}"])
    print(table(["sampler", "seeds", "median HV / grid", "range", "median HV / grid (top1, size)", "range",
                 "trials / grid"], summary))
    pairs = sum(1 for t in grid.trials if t.amount == 0) // 2
    print(f"{where}; 3-D hypervolume over top1 (%) x size_gzip_mb x latency_ms_p50. {space} space, "
          f"train.epochs={args.epochs} train.finetune_epochs={args.finetune_epochs}, {args.threads} torch "
          f"thread(s). Latency noise: the same model measured twice in the grid ({pairs} pairs) differs by a "
          f"median {latency_noise(grid):.1%}.")
    path = Path(args.csv or ROOT / "results" / f"search_vs_grid{'_quick' if args.quick else ''}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


if __name__ == "__main__":
    main()
