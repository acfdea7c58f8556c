"""The sweep loop: ask the study for trials, start them in the ledger, launch them through Hydra's launcher, tell the
study what their tasks returned; until the grid or the budget is done, a failure budget is spent, or a signal comes.

- **Resumable.** A grid is a set of points, enqueued as trials; a point with a COMPLETE trial never runs again, so
  the same command after an interruption runs only what is missing and a finished grid runs nothing. A budgeted
  sampler (TPE, NSGA-II, random) tops up to `n_trials` COMPLETE trials. Trials a dead process left RUNNING are
  settled first (pqsweep.sweeper.study.reap).
- **Failures** never end the sweep unless `max_failures` / `max_failure_rate` say so; the sweep ends with a summary,
  and exits 1 when a trial failed (`fail_on_failed_trials=false`: exit 0, the plugin's behaviour).
- **Signals.** Ctrl-C and SIGTERM (Slurm, Kubernetes, `timeout`) end it cleanly: the trials in flight FAIL in Optuna
  (a resume reruns them) and are KILLED in MLflow, as is the parent. Its status otherwise: FINISHED when the planned
  trials have ended, FAILED after a crash or a spent failure budget.
- Directions come from `study.objectives` (pqsweep.metrics), never from the sweep file.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import socket
import time
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from pqsweep import estimate, identity, interrupts, view
from pqsweep.console import duration, plural, say_launches_right
from pqsweep.stages import STAGES
from pqsweep.sweeper import space as spaces
from pqsweep.sweeper import study as studies
from pqsweep.sweeper import watch
from pqsweep.sweeper.command import prepare
from pqsweep.sweeper.ledger import Ledger
from pqsweep.sweeper.space import Space, StudyMismatch

log = logging.getLogger("pqsweep.sweeper")
# A trial that has ended for good: COMPLETE, or PRUNED by study.early_stop (a decision a resume keeps). Both count
# towards a budget's n_trials, as Optuna's own optimize counts pruned trials.
ENDED = (TrialState.COMPLETE, TrialState.PRUNED)


def sweep(plugin, arguments: list[str]) -> None:
    say_launches_right()
    try:
        space, ledger = prepare(plugin, arguments)
    except StudyMismatch as mismatch:  # before anything is written
        raise SystemExit(f"pqsweep: error: {mismatch}") from None
    interrupts.check()  # a Ctrl-C a finalizer swallowed while the study was made: stop before its first trial
    try:
        code = Loop(plugin, space, ledger).run()
    except Exception as error:  # noqa: BLE001 - the loop has ended what it ran (FAILED); say so in one line
        log.debug("the sweep stopped", exc_info=True)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SystemExit(f"pqsweep: error: the sweep stopped: {type(error).__name__}: {first}; its trials in flight "
                         f"and its parent run are FAILED, and the same command resumes it") from None
    if code:
        raise SystemExit(code)


class Loop:
    def __init__(self, plugin, space: Space, ledger: Ledger) -> None:
        self.plugin, self.space, self.ledger = plugin, space, ledger
        self.ended: list[tuple[Any, str, str]] = []  # (trial number, state, reason) of this run's trials
        self.signal: int | None = None
        self.attempted: set[tuple] = set()  # grid points this run launched
        self.began: dict[int, tuple[float, dict]] = {}  # trial number -> (its start, its point), for the progress line
        self.total, self.started = 0, time.monotonic()  # trials this run is to end, and since when (set by run)
        self.poll = 1.0  # s between looks at other workers' trials, while this one waits for them
        self.times: list[estimate.Ended] = []  # this run's ended trials, for the estimate of the time left

    # -- asking for trials ---------------------------------------------------------------------------------------

    def batch_size(self) -> int:
        launcher_jobs = self.plugin.config.hydra.launcher.get("n_jobs", 1) or 1
        if launcher_jobs < 0:
            launcher_jobs = max(1, (os.cpu_count() or 1) + 1 + launcher_jobs)  # joblib's -1: every core
        return max(self.plugin.n_jobs, launcher_jobs)

    def next_trials(self, n: int) -> list:
        """Up to `n` trials to run now: queued grid points, or new samples up to the budget."""
        study, ledger = self.ledger.study, self.ledger
        if self.space.grid:  # a point study.early_stop stopped (PRUNED) is decided: it does not run again
            taken = ledger.params(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
            for point in spaces.to_enqueue(self.space, taken, self.attempted):
                study.enqueue_trial(point, user_attrs={studies.POINT_ATTR: point})
            waiting = len(ledger.params(TrialState.WAITING))
            return [t for t in (study.ask() for _ in range(min(n, waiting))) if self.keep(t)]
        done = len(ledger.params(*ENDED, TrialState.RUNNING))
        return [study.ask() for _ in range(min(n, self.plugin.n_trials - done))]

    def keep(self, trial) -> bool:
        """A grid trial that did not come from the queue, or whose point another worker finished meanwhile, runs
        nothing: it is discarded."""
        stored = self.ledger.study.get_trials(deepcopy=False)
        queued = next(t for t in stored if t.number == trial.number)  # a study of before POINT_ATTR: fixed_params
        point = queued.user_attrs.get(studies.POINT_ATTR) or queued.system_attrs.get("fixed_params")
        others = [studies.trial_params(t) for t in stored if t.number != trial.number and not
                  t.user_attrs.get(studies.DISCARD_ATTR) and t.state in (*ENDED, TrialState.RUNNING)]
        if spaces.taken_by_another(self.space, point, others):
            self.ledger.discard(trial)
            return False
        return True

    def start(self, trial) -> tuple[str, tuple[str, ...]]:
        """The trial's point, recorded in the ledger before launch; returns (run id, the job's overrides)."""
        params = self.space.suggest(trial)
        self.attempted.add(self.space.key(params))
        self.began[trial.number] = (time.monotonic(), params)
        run_id = self.ledger.start(trial, params)
        overrides = self.space.assignments(params) + self.space.overrides + (
            f"launch.trial={trial.number}", f"launch.run_id={run_id}")
        if self.plugin.config.study.early_stop.enabled:  # the trial records its curve and reads the front there
            overrides += (f"launch.study='{self.ledger.name}'", f"launch.storage='{self.ledger.url}'")
        return run_id, overrides

    # -- telling what happened -----------------------------------------------------------------------------------

    @staticmethod
    def outcome_of(ret: JobReturn, objectives: list[str]) -> tuple[dict | None, str]:
        """(the trial's metrics, "") or (None, why it failed), from what its task returned. A job that raised keeps
        its exception in `_return_value`: Hydra's public `return_value` raises it and prints "Error executing job"
        to stderr, noise for a failure the summary reports."""
        if ret.status == JobStatus.FAILED:
            error = ret._return_value
            return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
        metrics = ret.return_value if isinstance(ret.return_value, dict) else {}
        if "error" in metrics:
            return None, str(metrics["error"])
        if "stopped" in metrics:
            return metrics, ""
        missing = [n for n in objectives if not isinstance(metrics.get(n), (int, float)) or math.isnan(metrics[n])]
        if missing:
            return None, f"the task returned no {', '.join(missing)}: {str(ret.return_value)[:200]}"
        return metrics, ""

    def outcome(self, ret: JobReturn) -> tuple[dict | None, str]:
        return self.outcome_of(ret, self.ledger.objectives)

    def finish(self, trial, run_id: str, ret: JobReturn) -> None:
        metrics, reason = self.outcome(ret)
        if metrics is not None and "stopped" in metrics:  # study.early_stop: its run is KILLED with the reason
            self.ledger.stop(trial, metrics["stopped"])
            self.ended.append((trial.number, "STOPPED", metrics["stopped"]))
            self.progress(trial.number, None, f"stopped early after {metrics['epochs_run']:.0f} fine-tune epochs")
            return
        if metrics is None:
            self.ledger.fail(trial, run_id, reason)  # closes a run whose job died before it ended
            log.warning("trial %d failed: %s", trial.number, reason)
            values = None
        else:
            values = self.ledger.complete(trial, metrics)
        self.ended.append((trial.number, "FAILED" if values is None else "FINISHED", reason))
        self.progress(trial.number, values, reason, estimate.stage_seconds(metrics or {}))

    def progress(self, number: int, values: list[float] | None, reason: str,
                 stages: dict[str, float] | None = None) -> None:
        """One line per ended trial: how far this run is, the trial's point and result, its time, the time left
        (pqsweep.estimate: what the trials to come will compute, the stages they load from the cache not counted)."""
        done, total = len(self.ended), max(self.total, len(self.ended))
        began, params = self.began.pop(number, (time.monotonic(), {}))
        now = time.monotonic()
        took, since = now - began, now - (self.times[-1].at if self.times else self.started)
        # the time since the last trial ended, not the trial's own: the bookkeeping between trials counts too, and
        # trials run side by side (a joblib launcher) share it
        self.times.append(estimate.Ended(since, stages or {}, params, at=now))
        point = " · ".join(f"{spaces.short(k)}={v}" for k, v in params.items())
        result = f"{self.ledger.objectives[0]} {values[0]:.4g}" if values else \
            reason if reason.startswith("stopped") else f"FAILED ({reason[:80]})"
        line = f"trial {done}/{total} · {point} · {result} · {duration(took)}"
        if done < total:
            left = estimate.remaining(self.times, self.to_come(total - done), self.shaped_by)
            line += f" · ~{duration(left)} left"
        log.info("%s", line)

    def to_come(self, n: int) -> list[dict | None]:
        """The `n` points this run has still to end: those in flight, then the grid's untried ones (a sampler's
        next points are not known: None)."""
        if not self.space.grid:
            return [None] * n
        untried = [p for p in spaces.remaining(self.space, self.ledger.params(TrialState.COMPLETE))
                   if self.space.key(p) not in self.attempted]
        return ([params for _, params in self.began.values()] + untried)[:n]

    @functools.cached_property
    def shaped_by(self) -> dict[str, tuple[str, ...]]:
        """Per stage, the swept keys that shape it (computed once: it reads the whole config per key)."""
        return {stage: identity.swept_shaping(self.plugin.config, self.space.swept, stage) for stage in STAGES}

    def abandon(self, launched: list, status: str, reason: str) -> None:
        """The trials in flight when the sweep stopped: FAIL in Optuna (a resume reruns them), `status` in MLflow;
        one whose run ended with its results just before the signal is COMPLETE from them."""
        for trial, (run_id, _) in launched:
            values = self.ledger.recorded(trial)
            if values is not None:
                try:
                    self.ledger.study.tell(trial, values=values)
                    self.ended.append((trial.number, "FINISHED", ""))
                    continue
                except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                    pass
            self.ledger.fail(trial, run_id, reason, status)
            self.ended.append((trial.number, status, reason))

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Returns the exit code."""
        ledger = self.ledger
        self.settle()
        log.info("study %s in %s: %s", ledger.name, ledger.storage_shown, self.plan())
        self.total, self.started = self.to_run(), time.monotonic()
        ledger.tag({"grid": spaces.grid_tag(self.space)} if self.space.grid else
                   {"n_trials": str(self.plugin.n_trials)})
        launched: list = []
        job_idx = 0
        try:
            with watch.signals(self):
                while not self.out_of_budget():
                    self.total += self.settle()  # a worker that died meanwhile: its points run here, before exit
                    trials = self.next_trials(self.batch_size())
                    if not trials and self.others_to_outlive():
                        time.sleep(self.poll)  # until they end, or die and their points come back to the queue
                        continue
                    if not trials:
                        break
                    # beating from before their runs start: a host lost while it starts them is still found
                    with watch.heartbeat(self.ledger.storage, trials):
                        launched = [(t, self.start(t)) for t in trials]
                        returns = self.plugin.launcher.launch([o for _, (_, o) in launched], initial_job_idx=job_idx)
                    job_idx += len(returns)
                    pending = []
                    for (trial, (run_id, overrides)), ret in zip(launched, returns):
                        if self.signal and self.outcome(ret)[0] is None:
                            pending.append((trial, (run_id, overrides)))  # failed by the interrupt: KILLED below
                        else:
                            self.finish(trial, run_id, ret)
                    launched = pending
                    if self.signal:  # it landed where a library caught it: SQLAlchemy raises its own error instead
                        raise KeyboardInterrupt(signal.Signals(self.signal).name)
        except KeyboardInterrupt:
            name = signal.Signals(self.signal or signal.SIGINT).name
            self.abandon(launched, "KILLED", f"interrupted by {name}")
            ledger.close("KILLED", f"interrupted by {name}")
            self.summarise()
            return 128 + (self.signal or signal.SIGINT)
        except BaseException as error:
            self.abandon(launched, "FAILED", f"the sweep crashed: {type(error).__name__}: {error}")
            ledger.close("FAILED", f"{type(error).__name__}: {error}")
            raise
        failed = [e for e in self.ended if e[1] in ("FAILED", "KILLED")]
        if self.out_of_budget():
            ledger.close("FAILED", f"stopped: {plural(len(failed), 'failed trial')}")
        elif not ledger.running():
            ledger.close("FINISHED")
        else:
            log.info("study %s: other workers still run trials; they will finish the parent run", ledger.name)
        self.summarise()
        self.save_results()
        return 1 if failed and self.plugin.fail_on_failed_trials else 0

    def others_to_outlive(self) -> bool:
        """Whether other workers still run trials whose end this worker can wait for: on this host a dead one's PID
        says so, on a storage with heartbeats a lost host's silence does. Waiting, it runs their points if they die;
        a journal shared across hosts keeps no heartbeat, so there the next command reruns them."""
        running = self.ledger.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        beating = studies.heartbeat_interval(self.ledger.storage)
        self.poll = beating or 1.0
        return any(beating or t.user_attrs.get(studies.HOST_ATTR) == socket.gethostname() for t in running)

    def settle(self) -> int:
        """Settle the trials of dead processes (pqsweep.sweeper.study.reap), at start and before every batch, so a
        worker that outlives another reruns its points; returns how many were failed (and will run again)."""
        completed, failed = self.ledger.reap()
        if failed:
            log.warning("study %s: %s left RUNNING by a dead process: failed, their runs KILLED, rerun",
                        self.ledger.name, plural(failed, "trial"))
        if completed:
            log.warning("study %s: %s of a dead process had finished their run: COMPLETE from its metrics",
                        self.ledger.name, plural(completed, "trial"))
        return failed

    def out_of_budget(self) -> bool:
        failed = sum(1 for e in self.ended if e[1] in ("FAILED", "KILLED"))
        if not failed:
            return False
        limit = self.plugin.max_failures
        if (limit is not None and failed >= limit) or failed / len(self.ended) > self.plugin.max_failure_rate:
            log.error("study %s: stopping, %d of %s failed (max_failures=%s, max_failure_rate=%s)",
                      self.ledger.name, failed, plural(len(self.ended), "trial"), limit, self.plugin.max_failure_rate)
            return True
        return False

    # -- what happened -------------------------------------------------------------------------------------------

    def to_run(self) -> int:
        """Grid points without a COMPLETE trial; for a budgeted sampler, the COMPLETE trials short of n_trials."""
        ended = self.ledger.params(*ENDED)
        if self.space.grid:
            return len(spaces.remaining(self.space, ended))
        return max(0, self.plugin.n_trials - len(ended))

    def plan(self) -> str:
        stopped = len(self.ledger.params(TrialState.PRUNED))
        plan = spaces.plan(self.space, self.ledger.params(*ENDED), self.plugin.n_trials)
        return plan + (f" ({stopped} of them stopped early)" if stopped else "")

    def summarise(self) -> None:
        finished = sum(1 for e in self.ended if e[1] == "FINISHED")
        stopped = sum(1 for e in self.ended if e[1] == "STOPPED")
        failed = [e for e in self.ended if e[1] == "FAILED"]
        killed = [e for e in self.ended if e[1] == "KILLED"]
        log.info("study %s: this run: %d finished, %s%d failed, %d killed; study: %s", self.ledger.name, finished,
                 f"{stopped} stopped early, " if stopped else "", len(failed), len(killed), self.plan())
        for number, status, reason in failed + killed:
            log.info("  trial %d %s: %s", number, status, reason)
        if not self.ledger.running():  # the worker that ends the study marks its front, once it is final
            self.ledger.mark_front()
        log.info("study %s in MLflow: %s", self.ledger.name, view.ui_link(self.ledger.experiment_id))
        self.ledger.tag({"trials_finished": str(finished), "trials_failed": str(len(failed)),
                         "trials_killed": str(len(killed)), "trials_stopped": str(stopped)})

    def save_results(self) -> None:
        """The plugin's optimization_results.yaml: the best trial, or the Pareto front."""
        directory = self.plugin.config.hydra.sweep.dir
        front = self.ledger.front()
        if not front or not os.path.isdir(directory):
            return
        solutions = [{"params": t.params, "values": t.values} for t in front]
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study": self.ledger.name, "solutions": solutions}),
                       os.path.join(directory, "optimization_results.yaml"))
