"""What a command costs before it does anything, side by side with `python -c "import hydra, omegaconf"`.

    .venv/bin/python benchmarks/startup.py                      # this checkout
    .venv/bin/python benchmarks/startup.py --against 59d15a6    # and a git revision, run from a worktree of it

Every command runs `--repeats` times, interleaved with the reference (and with the other revision), in fresh
processes; the table gives medians and ratios measured in this one run (absolute times on a shared machine are noise).
The run that trains nothing is `pqsweep train.epochs=0` on digits against a store and cache it has already created.
`floor` imports what such a run cannot do without: torch, and mlflow with its SQL store (digits' splits come from
the data cache after the first run, so scikit-learn is not among them).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def commands(work: Path) -> dict[str, list[str]]:
    store = [f"tracking.uri=sqlite:///{work}/mlflow.db", f"cache.dir={work}/cache", f"hydra.run.dir={work}/outputs"]
    pqsweep = str(BIN / "pqsweep")
    return {
        "reference": [sys.executable, "-c", "import hydra, omegaconf"],
        "pqsweep --help": [pqsweep, "--help"],
        "refused typo (model=nope)": [pqsweep, "model=nope"],
        "pqsweep --cfg job": [pqsweep, "--cfg", "job"],
        "run, train.epochs=0": [pqsweep, "train.epochs=0", *store],
        "floor: import torch, mlflow": [sys.executable, "-c", "import torch, mlflow, mlflow.store.tracking.sqlalchemy_store"],
    }


def seconds(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=env["PQSWEEP_BENCH_CWD"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", help="a git revision to time side by side (checked out in a worktree)")
    parser.add_argument("--csv", default=str(ROOT / "results" / "startup.csv"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pqsweep-startup-") as tmp:
        tmp = Path(tmp)
        sources = {"this": None}
        if args.against:
            worktree = tmp / "against"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(worktree), args.against],
                           check=True)
            sources[args.against] = worktree / "src"
        envs = {}
        for name, src in sources.items():
            work = tmp / f"work-{name}"
            work.mkdir()
            env = {**os.environ, "PQSWEEP_BENCH_CWD": str(work)}
            if src is not None:
                env["PYTHONPATH"] = str(src)  # ahead of the editable install: that revision's pqsweep
            envs[name] = (env, commands(work))
            seconds(envs[name][1]["run, train.epochs=0"], env)  # creates the store and the cached baseline
        times = {(name, label): [] for name in sources for label in commands(tmp)}
        for _ in range(args.repeats):
            for label in commands(tmp):
                for name, (env, cmds) in envs.items():
                    times[name, label].append(seconds(cmds[label], env))
        if args.against:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "against")], check=True)

    median = {key: statistics.median(values) for key, values in times.items()}
    reference = median["this", "reference"]
    header = ["command", "this (s)", "x reference"]
    if args.against:
        header += [f"{args.against} (s)", f"this / {args.against}"]
    rows = []
    for label in commands(Path(tmp)):
        row = [label, f"{median['this', label]:.2f}", f"{median['this', label] / reference:.1f}"]
        if args.against:
            row += [f"{median[args.against, label]:.2f}", f"{median['this', label] / median[args.against, label]:.2f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"medians of {args.repeats} interleaved runs each; {os.cpu_count()} CPUs")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


if __name__ == "__main__":
    main()
