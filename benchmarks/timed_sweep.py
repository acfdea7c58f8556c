"""One `pqsweep -m` sweep as its own process in a fresh directory, timed, and its trials read back from MLflow.

What benchmarks/framework.py, overhead.py and growth.py measure: each sweep gets a new MLflow store, study journal
and cache (every multirun is a persisted study, so a reused directory would run nothing), and the counts of what it
computed come from the tags every trial logs (`baseline_cached`, `prune_cached`, `baseline_metrics_cached`) and,
independently, from its log (pqsweep's "not in cache, training" line, tqdm's first draw of each fine-tuning bar).
Every process runs at `threads` torch threads (OMP_NUM_THREADS; default 1): on the shared 2-core machine a second
thread waits on other jobs' processes, which made the same command's wall time vary up to 6x between runs (and its
CPU time 4x: OpenMP spins while it waits); at one thread it varies far less. Not a benchmark itself: `make bench`
does not run it.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

# tqdm's first draw of a bar (no postfix yet); later draws add ", loss=..." or a count above 0
_FINETUNE_BAR = re.compile(r"finetune:\s+0%\|\s*\| 0/\d+ \[[0-9:]+<\?, \?epoch/s\]")
_BASELINE_TRAINED = re.compile(r"baseline \w+: not in cache, training")
# Hydra's line for each launched job: "[2026-12-01 12:05:24,939][HYDRA] \t#5 : pruning.amount=0.5 ..."
_LAUNCH = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[HYDRA\] \t#(\d+) : ", re.M)


@dataclass
class Trial:
    amount: float
    quantization: str
    metrics: dict[str, float]
    tags: dict[str, str]
    start_ms: int  # MLflow's start time: the sweeper creates the run just before it launches the trial
    end_ms: int


@dataclass
class Sweep:
    seconds: float  # wall time of the whole `pqsweep -m` process
    cpu_seconds: float  # its user + system CPU time (all threads): less moved than wall time by other jobs
    log: str  # its stdout and stderr
    trials: list[Trial]  # sorted by start time

    def computed(self, tag: str) -> int:
        """Trials that computed a stage instead of loading it (`<stage>_cached` is false)."""
        return sum(t.tags.get(tag) == "false" for t in self.trials)

    @property
    def baseline_trainings(self) -> int:
        return self.computed("baseline_cached")

    @property
    def finetunes(self) -> int:
        """Prune stages computed at a non-zero amount (amount 0 prunes nothing, so it fine-tunes nothing)."""
        return sum(t.tags.get("prune_cached") == "false" and t.amount > 0 for t in self.trials)

    @property
    def baseline_measurements(self) -> int:
        return self.computed("baseline_metrics_cached")

    @property
    def logged_trainings(self) -> int:
        return len(_BASELINE_TRAINED.findall(self.log))

    @property
    def logged_finetunes(self) -> int:
        return len(_FINETUNE_BAR.findall(self.log))

    def launch_times(self) -> list[float]:
        """Seconds at which Hydra logged each trial's launch, in order (its log has milliseconds)."""
        stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s, _ in _LAUNCH.findall(self.log)]
        return sorted(stamps)


def pinned(threads: int) -> dict[str, str]:
    """The environment of a benchmarked process: torch (and MKL, if it is used) at `threads` threads."""
    # TQDM_DISABLE=0: the bars that pqsweep.console hides where there is no terminal, which logged_finetunes counts
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "0"}


def run_sweep(overrides: list[str], work: Path, threads: int = 1, env: dict[str, str] | None = None) -> Sweep:
    """`pqsweep -m <overrides>` in `work` (created), with its store, study, cache and outputs all under `work`;
    `env`: more environment variables for it."""
    work.mkdir(parents=True)
    command = [str(BIN / "pqsweep"), "-m", *overrides, f"tracking.uri=sqlite:///{work}/mlflow.db",
               f"cache.dir={work}/cache", f"hydra.sweep.dir={work}/multirun"]
    env = pinned(threads) | (env or {})
    seconds, cpu_seconds, done = timed(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}")
    return Sweep(seconds, cpu_seconds, done.stdout, read_trials(work / "mlflow.db"))


def pqsweep(overrides: list[str], work: Path, cache: Path, threads: int) -> float:
    """Wall seconds of one `pqsweep -m` in `work` (its MLflow store and study journal there), caching in `cache`."""
    work.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "pqsweep"), "-m", *overrides, f"tracking.uri=sqlite:///{work}/mlflow.db",
               f"cache.dir={cache}", f"hydra.sweep.dir={work}/multirun"]
    seconds, _, done = timed(command, cwd=work, env=pinned(threads), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}")
    return seconds


def timed(command: list[str], **kwargs) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child, its result) of one subprocess.run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, **kwargs)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, done


def read_trials(db: Path) -> list[Trial]:
    from mlflow.tracking import MlflowClient  # after the timed part: importing mlflow takes seconds

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.stage = 'trial'", max_results=5000)
    trials = [Trial(float(r.data.params.get("pruning.amount", 0)), r.data.params["quantization"], r.data.metrics,
                    r.data.tags, r.info.start_time, r.info.end_time or r.info.start_time) for r in runs
              if r.info.status == "FINISHED"]
    return sorted(trials, key=lambda t: t.start_ms)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned like benchmarks/startup.py's: first column left, the others right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)
