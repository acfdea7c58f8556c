"""What distillation costs: one fine-tuning epoch of a pruned student, distilled from its baseline against plain,
timed in one process, alternating, and printed as the ratio of medians (the goal: at most 1.3 x, the teacher's
forward pass only).

    python benchmarks/distill_cost.py                         # cnn on mnist5k and resnet18_cifar on digits
    python benchmarks/distill_cost.py --repeats 5 --csv results/distill_cost.csv

Both sides start from the same pruned weights and the same loader order; the teacher is the baseline itself, as in
a run (pqsweep.pipeline.run hands the baseline it holds to the Context).
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pqsweep.pipeline import build_model, load_data
from pqsweep.pruning.unstructured import global_magnitude
from pqsweep.schema import register
from pqsweep.train import Context, fit

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CASES = {"cnn / mnist5k": ["model=cnn", "dataset=mnist5k"],
         "resnet18_cifar / digits": ["model=resnet18_cifar", "dataset=digits"]}


def timed_epoch(cfg, student, teacher, loaders) -> float:
    model = copy.deepcopy(student)
    ctx = Context(loaders, None, cfg.train, teacher=teacher)
    torch.manual_seed(0)
    start = time.perf_counter()
    ctx.finetune(model, epochs=1)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv")
    args = parser.parse_args(argv)
    register()
    torch.set_num_threads(1)
    rows = []
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        for name, overrides in CASES.items():
            cfg = compose("config", overrides=[*overrides, "train.distill.enabled=true"])
            splits, loaders = load_data(cfg)
            model = build_model(cfg, splits)
            fit(model, loaders["train"], cfg.train, 1)  # a teacher that has learnt something
            teacher = copy.deepcopy(model).eval()
            student = global_magnitude(copy.deepcopy(model), OmegaConf.create({"amount": 0.9}))
            plain, taught = [], []
            for _ in range(args.repeats):  # alternating, so a slow spell of the shared machine hits both
                plain.append(timed_epoch(cfg, student, None, loaders))
                taught.append(timed_epoch(cfg, student, teacher, loaders))
            ratio = statistics.median(taught) / statistics.median(plain)
            rows.append((name, statistics.median(plain), statistics.median(taught), ratio))
            print(f"{name}: plain {statistics.median(plain):.2f} s, distilled {statistics.median(taught):.2f} s "
                  f"per fine-tuning epoch (median of {args.repeats}): {ratio:.2f} x", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "plain_s", "distilled_s", "ratio"])
            writer.writerows(rows)


if __name__ == "__main__":
    main()
