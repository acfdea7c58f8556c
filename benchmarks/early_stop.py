"""Pareto-aware early stopping against none: the NSGA-II study of the cnn on mnist5k, with and without
`study.early_stop`, by the hypervolume each finds and the fine-tune epochs each runs.

    .venv/bin/python benchmarks/early_stop.py                       # 3 seeds x 24 trials, 8 fine-tune epochs
    .venv/bin/python benchmarks/early_stop.py --seeds 0 --trials 16  # a quick look
    .venv/bin/python benchmarks/early_stop.py --settings study.early_stop.margin=0 study.early_stop.min_trials=2 \
        --csv results/early_stop_aggressive.csv                     # a rule that stops more

Each seed runs sweeps/mnist_cnn_pareto_nsgaii.yaml (pruning global_magnitude | l1_filter, amount in [0, 0.99],
quantization none | fp16 | static_int8 | fake_quant with bits_w 2..8) twice at the same sampler seed, with
train.finetune_epochs=8, once plain and once with study.early_stop.enabled=true (its defaults: min_epoch 2, margin
1 pp, min_trials 4). The objectives are top1 and size_gzip_mb: the sweep file's third, latency, moves by a few
percent with the shared machine's load, which would make "as cheap" a coin toss on either side. Every sweep has its
own directory, study and cache, all starting from one baseline trained once (its cache entries copied in), so no side
loads a prune stage the other fine-tuned.

Then every stopped trial is run to the end alone (its params, same settings, its own cache), and the table says
whether any would have reached the stopping side's front: that is the rule's error, whatever the hypervolumes say.
"dominated plain (epochs)" is how many of the plain side's finished trials ended off its front, and the fine-tune
epochs they ran: the most a rule that never stops a front trial could have saved.
Hypervolume is pqsweep.reports.pareto.hypervolume over the finished trials, one reference point for both sides of a
seed (the worst top1 and size over both). Epochs are the trials' `finetune_epochs_run` tags (stopped ones: until they
stopped). The CSV is results/early_stop.csv.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from timed_sweep import BIN, ROOT, pinned, table

from pqsweep.reports.pareto import hypervolume, pareto_front, parse_objectives

OBJECTIVES = parse_objectives("top1,size_gzip_mb", default=[])
SWEEP = "sweep=mnist_cnn_pareto_nsgaii"


def run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, env=pinned(1), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")


def stores(work: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{work}/mlflow.db", f"cache.dir={work}/cache", f"hydra.sweep.dir={work}/multirun",
            f"hydra.run.dir={work}/outputs"]


def fresh(work: Path, base: Path) -> Path:
    """`work` with the baseline's cache entries (data, baseline, its metrics) and nothing else."""
    (work / "cache").mkdir(parents=True)
    for entry in (base / "cache").glob("*.pt"):
        if entry.name.split("-")[0] in ("data", "baseline", "baseline_metrics"):
            shutil.copy(entry, work / "cache" / entry.name)
    return work


def runs(work: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.stage = 'trial'", max_results=5000)


def point(r) -> list[float]:
    return [r.data.metrics["top1"], r.data.metrics["size_gzip_mb"]]


def overrides_of(r) -> list[str]:
    """The stopped trial's point as a command line, from its MLflow run's params."""
    keys = ["pruning", "pruning.amount", "quantization", "quantization.bits_w"]
    return [f"{k}={r.data.params[k]}" for k in keys if k in r.data.params]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=8, help="train.finetune_epochs")
    parser.add_argument("--settings", nargs="*", default=[], help="more study.early_stop overrides, e.g. "
                        "study.early_stop.margin=0 study.early_stop.min_trials=2")
    parser.add_argument("--csv", default=str(ROOT / "results" / "early_stop.csv"))
    args = parser.parse_args(argv)
    common = [SWEEP, f"train.finetune_epochs={args.epochs}", f"hydra.sweeper.n_trials={args.trials}",
              "study.objectives=[top1,size_gzip_mb]"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pqsweep-early-stop-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        run([str(BIN / "pqsweep"), "experiment=mnist_cnn", "pruning=none", "quantization=none", *stores(base)], base)
        for seed in args.seeds:
            sides = {}
            for side, extra in (("plain", []), ("early_stop", ["study.early_stop.enabled=true", *args.settings])):
                work = fresh(Path(tmp) / f"{side}-{seed}", base)
                run([str(BIN / "pqsweep"), "-m", *common, f"hydra.sweeper.sampler.seed={seed}", *extra,
                     *stores(work)], work)
                sides[side] = runs(work)
            finished = {s: [r for r in rs if r.info.status == "FINISHED"] for s, rs in sides.items()}
            stopped = [r for r in sides["early_stop"] if r.data.tags.get("early_stopped") == "true"]
            everything = [point(r) for rs in finished.values() for r in rs]
            reference = [min(p[0] for p in everything), max(p[1] for p in everything)]
            ended = []  # each stopped trial run to the end
            for i, r in enumerate(stopped):
                work = fresh(Path(tmp) / f"rerun-{seed}-{i}", base)
                run([str(BIN / "pqsweep"), SWEEP, f"train.finetune_epochs={args.epochs}", *overrides_of(r),
                     *stores(work)], work)
                ended.append(point(runs(work)[0]))
            front = [point(r) for r in finished["early_stop"]]
            reached = sum(pareto_front(front + [p], OBJECTIVES)[-1] for p in ended)
            volume = {s: hypervolume([point(r) for r in rs], OBJECTIVES, reference) for s, rs in finished.items()}
            epochs = {s: sum(int(r.data.tags.get("finetune_epochs_run", 0)) for r in rs) for s, rs in sides.items()}
            # the most any rule that never stops a front trial could save: the plain side's dominated trials' epochs
            plain = finished["plain"]
            on_front = pareto_front([point(r) for r in plain], OBJECTIVES)
            dominated = [r for r, front_ in zip(plain, on_front) if not front_]
            rows.append({"seed": seed, "settings": " ".join(args.settings) or "defaults", "trials": args.trials,
                         "stopped": len(stopped),
                         "would_have_reached_front": reached, "dominated_plain": len(dominated),
                         "dominated_epochs_plain": sum(int(r.data.tags.get("finetune_epochs_run", 0))
                                                       for r in dominated),
                         "hv_plain": volume["plain"], "hv_early_stop": volume["early_stop"],
                         "hv_ratio": volume["early_stop"] / volume["plain"] if volume["plain"] else float("nan"),
                         "epochs_plain": epochs["plain"], "epochs_early_stop": epochs["early_stop"],
                         "epochs_ratio": epochs["early_stop"] / epochs["plain"] if epochs["plain"] else float("nan")})
            print(rows[-1], flush=True)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shown = [[str(r["seed"]), str(r["stopped"]), str(r["would_have_reached_front"]),
              f"{r['dominated_plain']} ({r['dominated_epochs_plain']})", f"{r['hv_plain']:.4g}",
              f"{r['hv_early_stop']:.4g}", f"{r['hv_ratio']:.3f}", f"{r['epochs_plain']:.0f}",
              f"{r['epochs_early_stop']:.0f}", f"{r['epochs_ratio']:.2f}"] for r in rows]
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    shown.append(["mean", f"{mean('stopped'):.1f}", f"{mean('would_have_reached_front'):.1f}", "", "", "",
                  f"{mean('hv_ratio'):.3f}", "", "", f"{mean('epochs_ratio'):.2f}"])
    print(table(["seed", "stopped", "would reach front", "dominated plain (epochs)", "HV plain", "HV early_stop", "HV ratio", "epochs plain",
                 "epochs early_stop", "epochs ratio"], shown))
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
