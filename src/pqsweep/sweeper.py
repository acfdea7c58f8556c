"""pqsweep's sweeper: Hydra's Optuna sweeper plugin, with a study that persists, resumes and tells the truth.

It keeps the plugin's config (`hydra.sweeper.*`: sampler, storage, study_name, n_trials, n_jobs, params) and its
parsing of sweep overrides, and replaces its loop:

- **Persisted.** The study lives in `hydra.sweeper.storage` (`study.storage`): by default a journal file beside the
  MLflow store (pqsweep.study.default_storage), or any Optuna storage URL. Its identity (fixed settings and search
  space) is checked on every resume (pqsweep.study).
- **Resumable.** A grid is a set of points, enqueued as trials; a point with a COMPLETE trial never runs again, so
  the same command after an interruption runs only what is missing and a finished grid runs nothing. A budgeted
  sampler (TPE, NSGA-II, random) tops up to `n_trials` COMPLETE trials. Trials a dead process left RUNNING are failed
  (their MLflow runs KILLED) and run again.
- **Narrowed by the command line.** A value given on the command line for a key of the sweep file's grid selects
  those points of the same study (the plugin would instead run every other point once per ignored value).
- **One MLflow parent run per study**, created with the study; the sweeper creates each trial's MLflow run before it
  launches it, so each Optuna trial carries its run id (`mlflow_run_id`) and each run its trial number and study,
  through any launcher (joblib, submitit, Ray). The parent is FINISHED when the planned trials have ended, KILLED
  after Ctrl-C or SIGTERM, FAILED after a crash or a spent failure budget.
- **Failures** never end the sweep unless `max_failures` / `max_failure_rate` say so; the sweep ends with a summary,
  and exits 1 when a trial failed (`fail_on_failed_trials=false`: exit 0, the plugin's behaviour).
- **Conditional keys.** A swept key `g.k` under a swept group `g` (fake_quant's `quantization.bits_w`) is
  suggested only in trials whose option of `g` has `k`, as Optuna's define-by-run intends (TPE and NSGA-II take
  conditional parameters); which options have it is read from each option composed once at start-up.
- **Constraints.** `study.constraints` (`size_gzip_mb<=0.02`) become Optuna constraint values, computed from each
  trial's MLflow run before it is told, so TPE and NSGA-II prefer trials inside the budget. A grid runs every point.
- Directions come from `study.objectives` (pqsweep.config.METRICS), never repeated in a sweep file.

This module is imported when Hydra discovers plugins, so it imports optuna and mlflow only when a sweep starts.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _PluginSweeper
from omegaconf import OmegaConf

from pqsweep.config import directions

log = logging.getLogger(__name__)
LATE_STAGES = ("quantization", "measure", "export")  # keys that do not change the prune stage
ADHOC = "adhoc"  # study.name's default: a command-line grid is then named after its swept keys
CONSTRAINTS_KEY = "constraints"  # Optuna's: a trial's system attr `constraints:<name>` is one constraint value


@dataclass
class SweeperConf(OptunaSweeperConf):
    """The plugin's config plus pqsweep's keys (conf/hydra/sweeper/pqsweep.yaml fills them)."""

    _target_: str = "pqsweep.sweeper.OptunaSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "grid"}])
    max_failures: Optional[int] = None  # stop after this many failed trials in one run (null: never)
    fail_on_failed_trials: bool = True  # exit 1 when a trial failed; false: exit 0 as the plugin does
    heartbeat_interval: int = 30  # seconds between heartbeats of running trials on RDB storages (0: off)


ConfigStore.instance().store(group="hydra/sweeper", name="pqsweep_schema", node=SweeperConf, provider="pqsweep")


def clock(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 3.5 min, 1.2 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def is_grid(sampler) -> bool:
    return isinstance(sampler, functools.partial) and sampler.func.__name__ == "GridSampler"


def constraint_name(bound) -> str:
    """A bound as it names its constraint value in the study (`constraints:size_gzip_mb<=0.02`)."""
    return f"{bound.metric}{bound.op}{bound.limit:g}"


class OptunaSweeper(_PluginSweeper):
    def __init__(self, max_failures: int | None = None, fail_on_failed_trials: bool = True,
                 heartbeat_interval: int = 30, **plugin: Any) -> None:
        super().__init__(**plugin)
        self.max_failures = max_failures
        self.fail_on_failed_trials = fail_on_failed_trials
        self.heartbeat_interval = heartbeat_interval

    def sweep(self, arguments: list[str]) -> None:
        from pqsweep.study import StudyMismatch

        try:
            run = StudyRun(self, arguments)
        except StudyMismatch as mismatch:  # before anything is written
            raise SystemExit(f"pqsweep: error: {mismatch}") from None
        code = run.run()
        if code:
            raise SystemExit(code)


class StudyRun:
    """One process's work on a study: open or create it, run what is missing, summarise, set the parent's status."""

    def __init__(self, sweeper: OptunaSweeper, arguments: list[str]) -> None:
        import optuna

        from pqsweep import study as studies
        from pqsweep import tracking

        self.sweeper, self.impl, self.studies, self.tracking = sweeper, sweeper.sweeper, studies, tracking
        config = self.impl.config
        self.config = config
        self.objectives = list(config.study.objectives)
        self.directions = directions(self.objectives)
        if self.impl.direction is not None and list(self.impl._get_directions()) != self.directions:
            log.warning("hydra.sweeper.direction=%s ignored: the directions follow study.objectives %s: %s",
                        self.impl.direction, self.objectives, self.directions)
        self.grid = is_grid(self.impl.sampler)
        self.space, self.choices, self.fixed_overrides = self.search_space(arguments)
        self.bounds = self.constraint_bounds()
        self.conditions = {} if self.grid else self.conditional_keys()
        self.space = dict(sorted(self.space.items(), key=lambda item: item[0] in self.conditions))  # groups first
        swept = list(self.space)
        self.name = self.impl.study_name or ADHOC
        if self.name == ADHOC and swept:
            self.name = "+".join(swept)
        self.storage_url = self.impl.storage or studies.default_storage(tracking.resolve_uri(config.tracking.uri))
        self.storage_shown = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", str(self.storage_url))  # logs, tags
        storage = studies.open_storage(str(self.storage_url), sweeper.heartbeat_interval, self.on_heartbeat_stale)
        sampler = optuna.samplers.RandomSampler() if self.grid else self.impl.sampler  # grid points are enqueued
        fixed = studies.fixed_settings(config, swept)
        space = studies.space_json(self.space)
        self.study, self.created = studies.open_study(self.name, storage, sampler, self.directions)
        if not self.created:
            studies.wait_until_ready(self.study)
            studies.check_identity(self.study, fixed, space)
        # only once the command is known to fit the study; a resumed one stays in the experiment of its parent run
        # (a study begun before one experiment per study is not split, and no empty experiment of its name is made)
        tracking.connect(config)
        parent = self.study.user_attrs.get(studies.PARENT_ATTR)
        self.held = tracking.run_experiment(parent) if parent else None
        self.experiment_id = self.held or tracking.setup(config)
        if self.created or studies.FIXED_ATTR not in self.study.user_attrs:  # new, or made outside pqsweep
            self.study.set_user_attr(studies.FIXED_ATTR, fixed)
            self.study.set_user_attr(studies.SPACE_ATTR, space)
            self.study.set_metric_names(self.objectives)  # what optuna-dashboard and load_study show
        self.parent = self.open_parent()
        tracking.share_view(self.experiment_id, self.objectives, tuple(self.space))  # the runs table it opens with
        self.study.set_user_attr(studies.READY_ATTR, True)
        self.points = studies.grid_points(self.choices) if self.grid else []
        self.ended: list[tuple[Any, str, str]] = []  # (trial number, state, reason) of this run's trials
        self.signal: int | None = None
        self.attempted: set[tuple] = set()  # grid points this run launched
        self.began: dict[int, tuple[float, dict]] = {}  # trial number -> (its start, its point), for the progress line
        self.total, self.clock = 0, time.monotonic()  # trials this run is to end, and since when (set by run)

    # -- what is searched --------------------------------------------------------------------------------------

    def search_space(self, arguments: list[str]):
        """(distributions per swept key, a grid's values per key, the overrides every trial gets)."""
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides

        from pqsweep.study import StudyMismatch

        file_args = [f"{k}={v}" for k, v in (self.impl.params or {}).items()]
        file_space, file_fixed, _ = create_params_from_overrides(file_args)
        cli_space, cli_fixed, deletes = create_params_from_overrides(arguments)
        space = dict(file_space)
        choices = {k: OptunaSweeperImpl._to_grid_sampler_choices(d) for k, d in file_space.items()} if self.grid else {}
        for key, distribution in cli_space.items():
            if self.grid and key in file_space:  # a subset of the file's grid: the same study
                values = OptunaSweeperImpl._to_grid_sampler_choices(distribution)
                choices[key] = [self.in_grid(key, v, choices[key]) for v in values]
            else:
                space[key] = distribution
                if self.grid:
                    choices[key] = OptunaSweeperImpl._to_grid_sampler_choices(distribution)
        fixed = {**file_fixed, **cli_fixed}
        for key, value in cli_fixed.items():
            if key in file_space:
                if self.grid:
                    choices[key] = [self.in_grid(key, value, choices[key])]
                else:
                    del space[key]  # a budgeted search keeps the plugin's rule: the command line fixes the key
                    continue
                del fixed[key]
        # Points that share a prune stage run one after another (quantization varies fastest), so it is computed
        # once and loaded by the rest (pqsweep.cache.PrunedCache), not computed by parallel workers at once.
        choices = dict(sorted(choices.items(), key=lambda item: item[0].startswith(LATE_STAGES)))
        overrides = [f"{k}={v}" for k, v in fixed.items()] + list(deletes)
        if self.grid and not choices:
            raise StudyMismatch("a grid sweep needs swept keys: give some (key=a,b) or choose a sweep file")
        return space, choices, overrides

    def conditional_keys(self) -> dict[str, tuple[str, list[Any]]]:
        """{`g.k`: (`g`, the options of `g` that have `k`)} for the swept keys under a swept group that not every
        option of it has.

        A method's own keys (fake_quant's bits_w, l1_filter's scope) exist only under its option, and setting one
        on another option fails composition; the keys of the group's schema (bits, amount) exist under all. So each
        option is composed once, with the command's fixed overrides, as the launcher composes a trial, and the
        config it gives decides: no hand-kept table to go stale. A grid has none (the pre-run check composes each
        of its values alone, so it already refuses a key that some option lacks)."""
        from optuna.distributions import CategoricalDistribution

        from pqsweep.study import StudyMismatch

        loader, absent = self.impl.hydra_context.config_loader, object()
        conditions = {}
        for group, distribution in self.space.items():
            keys = [key for key in self.space if key.startswith(group + ".")]
            if not keys or not isinstance(distribution, CategoricalDistribution):
                continue
            having: dict[str, list[Any]] = {key: [] for key in keys}
            for option in distribution.choices:
                composed = loader.load_sweep_config(self.config, [*self.fixed_overrides, f"{group}={option}"])
                for key in keys:
                    if OmegaConf.select(composed, key, default=absent) is not absent:
                        having[key].append(option)
            for key, options in having.items():
                if not options:
                    raise StudyMismatch(f"{key}: no option of {group} ({', '.join(map(str, distribution.choices))}) "
                                        f"has it; sweep it with {group} fixed to an option that has it")
                if len(options) < len(distribution.choices):
                    conditions[key] = (group, options)
                    log.info("%s is suggested only with %s=%s", key, group, ",".join(map(str, options)))
        return conditions

    def constraint_bounds(self) -> list:
        """study.constraints as pqsweep.reports.pareto Bounds, or StudyMismatch naming the bad one (before any store
        is opened). A sampler whose config has no constraints_func (grid, random, CMA-ES, QMC) never reads the
        constraint values, which are recorded all the same (the study's best_trials and optuna-dashboard show who
        is inside): said, not left silent."""
        from pqsweep.config import METRICS
        from pqsweep.reports.pareto import parse_bounds
        from pqsweep.study import StudyMismatch

        bounds = []
        for text in self.config.study.constraints:
            try:
                parsed = parse_bounds(text)
            except ValueError as error:
                raise StudyMismatch(f"study.constraints={text}: {error}") from None
            unknown = [b.metric for b in parsed if b.metric not in METRICS]
            if unknown or not parsed:
                raise StudyMismatch(f"study.constraints={text}: {unknown[0] if unknown else 'empty'}: bound a "
                                    f"metric among {', '.join(METRICS)} (e.g. size_gzip_mb<=0.02)")
            bounds += parsed
        sampler = self.config.hydra.sweeper.sampler
        if bounds and "constraints_func" not in sampler:
            log.warning("study.constraints %s: not followed by the %s sampler, which runs its trials whatever they "
                        "measure (their constraint values are recorded); tpe and nsgaii spend their trials within "
                        "them", list(self.config.study.constraints),
                        "grid" if self.grid else sampler._target_.rsplit(".", 1)[-1])
        return bounds

    def in_grid(self, key: str, value: Any, choices: list[Any]) -> Any:
        from pqsweep.study import StudyMismatch, norm

        for choice in choices:
            if norm(choice) == norm(value) or str(choice) == str(value):
                return choice
        raise StudyMismatch(
            f"{key}={value} is not in the grid of study {self.impl.study_name} ({', '.join(map(str, choices))}); "
            f"choose among those, or start a new study with study.name=<new name>"
        )

    # -- MLflow ------------------------------------------------------------------------------------------------

    def open_parent(self) -> str:
        parent = self.study.user_attrs.get(self.studies.PARENT_ATTR)
        if self.held:  # the store holds it
            self.tracking.resume_run(parent)
            log.info("study %s: resuming under MLflow parent run %s", self.name, parent)
            return parent
        params = {f"sweeper.{k}": str(v) for k, v in (self.impl.params or {}).items()}
        params.update({f"space.{k}": str(v) for k, v in self.space.items()})
        params["sweeper"] = "pqsweep"
        params["sampler"] = "grid" if self.grid else type(self.impl.sampler).__name__
        params["objectives"] = ",".join(self.objectives)
        if self.bounds:
            params["constraints"] = ",".join(constraint_name(b) for b in self.bounds)
        tags = {"stage": "sweep", "sweep": self.name, "optuna_study": self.name, "optuna_storage": self.storage_shown}
        parent = self.tracking.create_parent(self.experiment_id, f"sweep-{self.name}", params, tags)
        self.study.set_user_attr(self.studies.PARENT_ATTR, parent)
        return parent

    def on_heartbeat_stale(self, study, trial) -> None:
        self.tracking.close_run(trial.user_attrs.get(self.studies.RUN_ATTR), "KILLED", "its heartbeat stopped")

    def recorded(self, trial) -> list[float] | None:
        """The objectives of the trial's MLflow run, when it ended FINISHED with all of them. Its constraint values
        are stored on the trial then too, so one completed from its run without a tell (pqsweep.study.reap) is
        constrained like the others."""
        run_id = trial.user_attrs.get(self.studies.RUN_ATTR)
        values = self.tracking.finished_values(run_id, self.objectives)
        if values is not None:
            self.constrain(trial, run_id)
        return values

    def constrain(self, trial, run_id: str) -> None:
        """Set the trial's Optuna constraint values (<= 0: within the bound), one per bound of study.constraints,
        from its run's metrics, before it is told: NSGA-II and TPE rank by `trial.constraints`. This is what
        `constraints_func` did before Optuna 5 deprecated it for `Trial.set_constraint`, written through the storage
        so a FrozenTrial (a reaped trial) takes it too. A metric the run lacks gives +inf: outside the budget."""
        from pqsweep.reports.pareto import constraint_values

        if not self.bounds:
            return
        metrics = self.tracking.finished_metrics(run_id) or {}  # one read of the run, whatever the bounds
        for bound, value in zip(self.bounds, constraint_values(metrics, self.bounds)):
            self.study._storage.set_trial_system_attr(trial._trial_id, f"{CONSTRAINTS_KEY}:{constraint_name(bound)}",
                                                      value)

    def on_dead_owner(self, trial, reason: str) -> None:
        self.tracking.close_run(trial.user_attrs.get(self.studies.RUN_ATTR), "KILLED", reason)

    # -- the loop ----------------------------------------------------------------------------------------------

    def batch_size(self) -> int:
        launcher_jobs = self.config.hydra.launcher.get("n_jobs", 1) or 1
        if launcher_jobs < 0:
            launcher_jobs = max(1, (os.cpu_count() or 1) + 1 + launcher_jobs)  # joblib's -1: every core
        return max(self.impl.n_jobs, launcher_jobs)

    def next_trials(self, n: int) -> list:
        """Up to `n` trials to run now: queued grid points, or new samples up to the budget."""
        from optuna.trial import TrialState

        s, studies = self.study, self.studies
        if self.grid:
            names = list(self.choices)
            for point in studies.missing_points(s, self.points):
                if studies.point_key(point, names) not in self.attempted:  # a failed point waits for the next run
                    s.enqueue_trial(point)
            waiting = len(studies.real_trials(s, (TrialState.WAITING,)))
            trials = [s.ask() for _ in range(min(n, waiting))]
            return [t for t in trials if self.keep(t)]
        done = len(studies.real_trials(s, (TrialState.COMPLETE, TrialState.RUNNING)))
        return [s.ask() for _ in range(min(n, self.impl.n_trials - done))]

    def keep(self, trial) -> bool:
        """A grid trial that did not come from the queue, or whose point another worker finished meanwhile, runs
        nothing: it is failed and marked discarded, so no count or report sees it."""
        from optuna.trial import TrialState

        studies = self.studies
        params = self.study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
        names = list(self.choices)
        taken = params is None or any(
            studies.point_key(studies.trial_params(t), names) == studies.point_key(params, names)
            for t in studies.real_trials(self.study, (TrialState.COMPLETE, TrialState.RUNNING))
            if t.number != trial.number
        )
        if taken:
            trial.set_user_attr(studies.DISCARD_ATTR, True)
            self.study.tell(trial, state=TrialState.FAIL)
        return not taken

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's values for the swept keys (a queued grid point's own values, else the sampler's); a
        conditional key only where the option chosen for its group has it (groups come first in the space)."""
        params: dict[str, Any] = {}
        for name, distribution in self.space.items():
            group, options = self.conditions.get(name, (None, ()))
            if group is None or params[group] in options:
                params[name] = trial._suggest(name, distribution)
        return params

    def start(self, trial) -> tuple[str, tuple[str, ...]]:
        """Record the trial's owner and MLflow run before launching it; returns (run id, the job's overrides)."""
        params = self.suggest(trial)
        self.attempted.add(self.studies.point_key(params, list(self.choices)))
        for key, value in self.studies.owner().items():
            trial.set_user_attr(key, value)
        self.began[trial.number] = (time.monotonic(), params)
        name = " ".join(f"{k}={v}" for k, v in params.items())
        run_id = self.tracking.create_trial_run(
            self.experiment_id, self.parent, name[:250],
            {"stage": "trial", "sweep": self.name, "optuna_study": self.name,
             "optuna_trial_number": str(trial.number), "trial_number": str(trial.number)},
        )
        trial.set_user_attr(self.studies.RUN_ATTR, run_id)
        overrides = tuple(f"{k}={v}" for k, v in params.items()) + tuple(self.fixed_overrides) + (
            f"study.trial={trial.number}", f"tracking.run_id={run_id}")
        return run_id, overrides

    def finish(self, trial, run_id: str, ret: JobReturn) -> None:
        from optuna.trial import TrialState

        values, reason = self.outcome(ret, run_id)
        if values is None:
            trial.set_user_attr(self.studies.ERROR_ATTR, reason)
            self.study.tell(trial, state=TrialState.FAIL)
            self.tracking.close_run(run_id, "FAILED", reason)  # a job that died before its run ended
            log.warning("trial %d failed: %s", trial.number, reason)
        else:
            self.constrain(trial, run_id)
            self.study.tell(trial, values=values)
        self.ended.append((trial.number, "FAILED" if values is None else "FINISHED", reason))
        self.progress(trial.number, values, reason)

    def progress(self, number: int, values: list[float] | None, reason: str) -> None:
        """One line per ended trial: how far this run is, the trial's point and result, its time, the time left."""
        done, total = len(self.ended), max(self.total, len(self.ended))
        began, params = self.began.pop(number, (time.monotonic(), {}))
        point = " · ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in params.items())
        result = f"{self.objectives[0]} {values[0]:.4g}" if values else f"FAILED ({reason[:80]})"
        line = f"trial {done}/{total} · {point} · {result} · {clock(time.monotonic() - began)}"
        if done < total:
            line += f" · ~{clock((time.monotonic() - self.clock) / done * (total - done))} left"
        log.info("%s", line)

    def outcome(self, ret: JobReturn, run_id: str) -> tuple[list[float] | None, str]:
        if ret.status == JobStatus.FAILED:
            error = ret._return_value
            return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
        value = ret.return_value
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if len(values) != len(self.directions) or any(math.isnan(v) for v in values):
            return None, self.tracking.run_error(run_id) or f"the task returned {value!r}"
        return values, ""

    @contextmanager
    def heartbeat(self, trials: list) -> Iterator[None]:
        """Optuna's heartbeat for the trials in flight, on storages that keep one (RDB)."""
        from optuna.storages._heartbeat import is_heartbeat_enabled

        storage = self.study._storage
        if not is_heartbeat_enabled(storage):
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while True:
                for trial in trials:
                    storage.record_heartbeat(trial._trial_id)
                if stop.wait(storage.get_heartbeat_interval()):
                    return

        thread = threading.Thread(target=beat, name="pqsweep-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    @contextmanager
    def signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM (Slurm, Kubernetes, `timeout`) both end the sweep cleanly, as KeyboardInterrupt."""

        def interrupt(signum, frame):
            self.signal = signum
            raise KeyboardInterrupt(signal.Signals(signum).name)

        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def run(self) -> int:
        """Returns the exit code."""
        from optuna.trial import TrialState

        completed, failed = self.studies.reap(self.study, self.on_dead_owner, self.recorded)
        if failed:
            log.warning("study %s: %d trial(s) left RUNNING by a dead process: failed, their runs KILLED, rerun",
                        self.name, failed)
        if completed:
            log.warning("study %s: %d trial(s) of a dead process had finished their run: COMPLETE from its metrics",
                        self.name, completed)
        log.info("study %s in %s: %s", self.name, self.storage_shown, self.plan())
        self.total, self.clock = self.to_run(), time.monotonic()
        self.tracking.set_tags(self.parent, {"grid": json.dumps(self.choices, default=str)[:5000]} if self.grid else
                               {"n_trials": str(self.impl.n_trials)})
        launched: list = []
        job_idx = 0
        try:
            with self.signals():
                while not self.out_of_budget():
                    trials = self.next_trials(self.batch_size())
                    if not trials:
                        break
                    started = [self.start(t) for t in trials]
                    launched = list(zip(trials, started))
                    with self.heartbeat(trials):
                        returns = self.impl.launcher.launch([o for _, o in started], initial_job_idx=job_idx)
                    job_idx += len(returns)
                    pending = []
                    for (trial, (run_id, overrides)), ret in zip(launched, returns):
                        if self.signal and self.outcome(ret, run_id)[0] is None:
                            pending.append((trial, (run_id, overrides)))  # failed by the interrupt: KILLED below
                        else:
                            self.finish(trial, run_id, ret)
                    launched = pending
                    if self.signal:  # it landed where a library caught it: SQLAlchemy raises its own error instead
                        raise KeyboardInterrupt(signal.Signals(self.signal).name)
        except KeyboardInterrupt:
            name = signal.Signals(self.signal or signal.SIGINT).name
            self.abandon(launched, "KILLED", f"interrupted by {name}")
            self.tracking.close_run(self.parent, "KILLED", f"interrupted by {name}")
            self.summarise()
            return 128 + (self.signal or signal.SIGINT)
        except BaseException as error:
            self.abandon(launched, "FAILED", f"the sweep crashed: {type(error).__name__}: {error}")
            self.tracking.close_run(self.parent, "FAILED", f"{type(error).__name__}: {error}")
            raise
        failed = [e for e in self.ended if e[1] != "FINISHED"]
        if self.out_of_budget():
            self.tracking.close_run(self.parent, "FAILED", f"stopped: {len(failed)} failed trials")
        elif not self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.tracking.close_run(self.parent, "FINISHED")
        else:
            log.info("study %s: other workers still run trials; they will finish the parent run", self.name)
        self.summarise()
        self.save_results()
        return 1 if failed and self.sweeper.fail_on_failed_trials else 0

    def out_of_budget(self) -> bool:
        failed = sum(1 for e in self.ended if e[1] != "FINISHED")
        if not failed:
            return False
        limit = self.sweeper.max_failures
        if (limit is not None and failed >= limit) or failed / len(self.ended) > self.impl.max_failure_rate:
            log.error("study %s: stopping, %d of %d trials failed (max_failures=%s, max_failure_rate=%s)",
                      self.name, failed, len(self.ended), limit, self.impl.max_failure_rate)
            return True
        return False

    def abandon(self, launched: list, status: str, reason: str) -> None:
        """The trials in flight when the sweep stopped: FAIL in Optuna (so a resume reruns them), `status` in MLflow."""
        from optuna.trial import TrialState

        for trial, (run_id, _) in launched:
            values = self.recorded(trial)
            try:
                if values is not None:  # its run ended with its results just before the signal
                    self.study.tell(trial, values=values)
                    self.ended.append((trial.number, "FINISHED", ""))
                    continue
                trial.set_user_attr(self.studies.ERROR_ATTR, reason)
                self.study.tell(trial, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - told already (it ended just before the signal)
                pass
            self.tracking.close_run(run_id, status, reason, replace=("FAILED",) if status == "KILLED" else ())
            self.ended.append((trial.number, status, reason))

    # -- what happened -----------------------------------------------------------------------------------------

    def to_run(self) -> int:
        """Grid points without a COMPLETE trial; for a budgeted sampler, the COMPLETE trials short of n_trials."""
        from optuna.trial import TrialState

        complete = list(self.studies.real_trials(self.study, (TrialState.COMPLETE,)))
        if self.grid:
            names = list(self.choices)
            done = {self.studies.point_key(self.studies.trial_params(t), names) for t in complete}
            return sum(1 for p in self.points if self.studies.point_key(p, names) not in done)
        return max(0, self.impl.n_trials - len(complete))

    def plan(self) -> str:
        from optuna.trial import TrialState

        if self.grid:
            todo = self.to_run()
            return f"{len(self.points)} grid points, {len(self.points) - todo} done, {todo} to run"
        complete = sum(1 for _ in self.studies.real_trials(self.study, (TrialState.COMPLETE,)))
        return f"{complete} of n_trials={self.impl.n_trials} trials done"

    def summarise(self) -> None:
        finished = sum(1 for e in self.ended if e[1] == "FINISHED")
        failed = [e for e in self.ended if e[1] == "FAILED"]
        killed = [e for e in self.ended if e[1] == "KILLED"]
        log.info("study %s: this run: %d finished, %d failed, %d killed; study: %s",
                 self.name, finished, len(failed), len(killed), self.plan())
        for number, status, reason in failed + killed:
            log.info("  trial %d %s: %s", number, status, reason)
        log.info("study %s in MLflow: %s", self.name, self.tracking.ui_link(self.experiment_id))
        self.tracking.set_tags(self.parent, {"trials_finished": str(finished), "trials_failed": str(len(failed)),
                                             "trials_killed": str(len(killed))})

    def save_results(self) -> None:
        """The plugin's optimization_results.yaml: the best trial, or the Pareto front."""
        from omegaconf import OmegaConf

        if not any(True for _ in self.studies.real_trials(self.study)) or not os.path.isdir(self.config.hydra.sweep.dir):
            return
        try:
            best = self.study.best_trials
        except ValueError:
            return
        front = [{"params": t.params, "values": t.values} for t in best if not t.user_attrs.get(self.studies.DISCARD_ATTR)]
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study": self.name, "solutions": front}),
                       os.path.join(self.config.hydra.sweep.dir, "optimization_results.yaml"))
