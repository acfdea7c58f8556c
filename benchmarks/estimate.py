"""How true the sweep's "~N left" is: after each trial, what it said against the time the sweep then really took,
beside what the former estimate (the mean trial time so far, times the trials to come) would have said, from the
same run's timestamps.

    python benchmarks/estimate.py                       # `pqsweep -m sweep=mnist_cnn_sparsity_x_precision` (make run's
                                                        # sweep) in a fresh directory; results/estimate.csv
    python benchmarks/estimate.py --log sweep.log       # the same, read from the log of a sweep already run

The ratio said / real is taken in one run, so other jobs slow both sides alike until the sweep ends; a job that
starts or stops midway moves the real time and no estimate can see it coming (the machine is shared: read the
ratios of several trials, not one). The goal (issue 24): within 2x after a quarter of the trials.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timed_sweep import ROOT, run_sweep  # noqa: E402

STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[HYDRA\] "
PLAN = re.compile(STAMP + r"study \S+ in .*: \d+ grid points?, ", re.M)
DURATION = r"[\d.]+ (?:s|min|h)"
TRIAL = re.compile(STAMP + rf"trial (\d+)/(\d+) · .*? · ({DURATION})(?: · ~({DURATION}) left)?$", re.M)
END = re.compile(STAMP + r"study \S+: this run: ", re.M)


def seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def when(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def rows_of(log: str) -> list[dict]:
    """One row per trial but the last: the estimate it printed, the former one, and the real time left."""
    started, ended = when(PLAN.search(log).group(1)), when(END.search(log).group(1))
    rows = []
    for stamp, done, total, _, said in TRIAL.findall(log):
        done, total, at = int(done), int(total), when(stamp)
        if done == total:
            continue
        rows.append({"trial": done, "of": total, "said_s": seconds(said),
                     "former_s": (at - started) / done * (total - done), "real_s": ended - at})
    for row in rows:
        row["said/real"] = row["said_s"] / row["real_s"]
        row["former/real"] = row["former_s"] / row["real_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="mnist_cnn_sparsity_x_precision")
    parser.add_argument("--log", type=Path, help="read this sweep's log instead of running one")
    parser.add_argument("--csv", type=Path, default=ROOT / "results" / "estimate.csv")
    args = parser.parse_args()
    if args.log:
        log = args.log.read_text()
    else:
        with tempfile.TemporaryDirectory(prefix="pqsweep-estimate-") as work:
            log = run_sweep([f"sweep={args.sweep}"], Path(work) / "run").log
    rows = rows_of(log)
    quarter = math.ceil(rows[0]["of"] / 4)
    print(f"{'trial':>7} {'said':>8} {'former':>8} {'real':>8} {'said/real':>10} {'former/real':>12}")
    for r in rows:
        mark = "  <- a quarter done" if r["trial"] == quarter else ""
        print(f"{r['trial']:>4}/{r['of']:<2} {r['said_s']:>7.0f}s {r['former_s']:>7.0f}s {r['real_s']:>7.0f}s "
              f"{r['said/real']:>10.2f} {r['former/real']:>12.2f}{mark}")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
