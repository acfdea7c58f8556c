"""A study's records, written in one place: the Optuna study (its identity, trials, values, constraints and owners)
and its MLflow parent run and trial runs, kept in step.

`Ledger.open` opens or creates the study (refusing one whose identity differs, before anything is written), its
experiment and its parent run; `start` records a trial's owner and creates its MLflow run before it launches, so
each Optuna trial carries its run id through any launcher; `complete`, `fail` and `close` end each in both stores.
The metrics a trial reports come from its task's return value; only a trial whose process died is read back from
its MLflow run (`recorded`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, Trial, TrialState

from pqsweep import identity, tracking, view
from pqsweep.early_stop import STOPPED_ATTR, TOP1_ATTR
from pqsweep.reports.pareto import Bound, constraint_values
from pqsweep.sweeper import study as studies
from pqsweep.sweeper.space import Space, StudyMismatch

log = logging.getLogger(__name__)


def constraint_name(bound: Bound) -> str:
    """A bound as it names its constraint (`size_gzip_mb<=0.02`)."""
    return f"{bound.metric}{bound.op}{bound.limit:g}"


@dataclass
class Ledger:
    study: optuna.Study
    storage: Any
    name: str
    experiment_id: str
    parent: str
    objectives: list[str]
    bounds: list[Bound]
    storage_shown: str  # the storage URL with its password masked: for logs and tags
    url: str = ""  # the storage URL itself: a trial of study.early_stop records its curve there

    @classmethod
    def open(cls, config: DictConfig, name: str, space: Space, sampler, storage_url: str, heartbeat: int,
             bounds: list[Bound], parent_params: dict[str, str]) -> "Ledger":
        """The study `name`, created or resumed, with its MLflow experiment and parent run."""
        objectives = list(config.study.objectives)
        shown = tracking.masked(str(storage_url))
        on_stale = lambda study, trial: tracking.close_run(trial.user_attrs.get(studies.RUN_ATTR), "KILLED",  # noqa: E731
                                                           "its heartbeat stopped")
        fixed = identity.fixed_settings(config, space.swept)
        try:
            storage = studies.open_storage(str(storage_url), heartbeat, on_stale)
            study, created = studies.open_study(name, storage, sampler, [m.direction for m in _metrics(objectives)])
        except Exception as error:  # noqa: BLE001 - the driver's or the database's own answer, in one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise StudyMismatch(f"hydra.sweeper.storage={shown} cannot be opened: {type(error).__name__}: "
                                f"{first[:300]}") from None
        if not created:
            studies.wait_until_ready(study)
            studies.check_identity(study, config, fixed, space.stored())
        # One study, one MLflow store: a resumed study's parent run must be in the store this command logs to, or
        # its trials would land in a second store whose report shows none of the first's (refused before writing).
        uri = tracking.resolve_uri(config.tracking.uri)
        parent = study.user_attrs.get(studies.PARENT_ATTR)
        held = tracking.experiment_holding(uri, parent) if parent else None
        if parent and held is None:
            kept = study.user_attrs.get(studies.TRACKING_ATTR, "another MLflow store")
            raise StudyMismatch(f"study {name} keeps its runs in {kept} (its parent run {parent}), which "
                                f"tracking.uri={tracking.masked(uri)} does not hold; resume it with that tracking.uri, "
                                f"or start a new study with study.name=<new name>")
        # only once the command is known to fit the study; a resumed one stays in the experiment of its parent run
        # (a study begun before one experiment per study is not split, and no empty experiment of its name is made)
        tracking.connect(config)
        experiment_id = held or tracking.setup(config)
        if created or studies.FIXED_ATTR not in study.user_attrs:  # new, or made outside pqsweep
            study.set_user_attr(studies.FIXED_ATTR, fixed)
            study.set_user_attr(studies.SPACE_ATTR, space.stored())
            with warnings.catch_warnings():  # experimental in Optuna 5; used on purpose, so not shown
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(objectives)  # what optuna-dashboard and load_study show
        if held:
            tracking.resume_run(parent)
            log.info("study %s: resuming under MLflow parent run %s", name, parent)
        else:
            tags = {"optuna_study": name, "optuna_storage": shown}
            parent = tracking.create_parent(experiment_id, name, parent_params, tags)
            study.set_user_attr(studies.TRACKING_ATTR, tracking.masked(uri))
            study.set_user_attr(studies.PARENT_ATTR, parent)
        view.share_view(experiment_id, objectives, tuple(space.logged()))  # the runs table it opens with
        study.set_user_attr(studies.READY_ATTR, True)
        return cls(study, storage, name, experiment_id, parent, objectives, bounds, shown, str(storage_url))

    # -- trials ---------------------------------------------------------------------------------------------------

    def start(self, trial: Trial, params: dict[str, Any]) -> str:
        """Record the trial's owner and create its MLflow run before it is launched; returns the run id."""
        for key, value in studies.owner().items():
            trial.set_user_attr(key, value)
        run_id = tracking.create_trial_run(self.experiment_id, self.parent, self.name, trial.number,
                                           " ".join(f"{k}={v}" for k, v in params.items()))
        trial.set_user_attr(studies.RUN_ATTR, run_id)
        return run_id

    def complete(self, trial: Trial, metrics: dict[str, float]) -> list[float]:
        """Tell the trial its objectives, with one Optuna constraint per bound of study.constraints (<= 0: within
        it; a metric the trial lacks: +inf), which NSGA-II and TPE rank by."""
        self.constrain(trial, metrics)
        if "top1" in metrics:  # where a curve led: what study.early_stop learns its best case from
            trial.set_user_attr(TOP1_ATTR, float(metrics["top1"]))
        values = [float(metrics[name]) for name in self.objectives]
        self.study.tell(trial, values=values)
        return values

    def constrain(self, trial: Trial, metrics: dict[str, float]) -> None:
        for bound, value in zip(self.bounds, constraint_values(metrics, self.bounds)):
            trial.set_constraint(constraint_name(bound), value)

    def fail(self, trial: Trial, run_id: str | None, reason: str, status: str = "FAILED") -> None:
        """FAIL in Optuna (a resume runs it again), `status` in MLflow with the reason; a run that ended on its own
        keeps its status, except that FAILED by the error a library raised in place of Ctrl-C becomes KILLED."""
        try:
            trial.set_user_attr(studies.ERROR_ATTR, reason)
            self.study.tell(trial, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            pass  # told already (it ended just before the signal)
        tracking.close_run(run_id, status, reason, replace=("FAILED",) if status == "KILLED" else ())

    def stop(self, trial: Trial, reason: str) -> None:
        """A trial study.early_stop stopped: PRUNED in Optuna with why (its task ended its MLflow run KILLED), so
        a resumed study keeps the decision and no count of failures sees it."""
        trial.set_user_attr(STOPPED_ATTR, reason)
        self.study.tell(trial, state=TrialState.PRUNED)

    def discard(self, trial: Trial) -> None:
        """A trial that runs nothing (another worker took its point): failed and marked, so no count sees it."""
        trial.set_user_attr(studies.DISCARD_ATTR, True)
        self.study.tell(trial, state=TrialState.FAIL)

    def recorded(self, trial: FrozenTrial | Trial) -> list[float] | None:
        """The objectives of a trial whose process is gone, from its MLflow run when that ended FINISHED with all
        of them; its constraints are set from the same metrics."""
        metrics = tracking.finished_metrics(trial.user_attrs.get(studies.RUN_ATTR))
        if metrics is None or not all(name in metrics for name in self.objectives):
            return None
        self.constrain(trial if isinstance(trial, Trial) else studies.live(self.study, trial), metrics)
        return [metrics[name] for name in self.objectives]

    def reap(self) -> tuple[int, int]:
        def close(trial: FrozenTrial, reason: str) -> None:
            tracking.close_run(trial.user_attrs.get(studies.RUN_ATTR), "KILLED", reason)

        return studies.reap(self.study, close, self.recorded)

    # -- what the study holds -------------------------------------------------------------------------------------

    def params(self, *states: TrialState) -> list[dict[str, Any]]:
        return studies.params_of(self.study, states)

    def running(self) -> bool:
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def close(self, status: str, reason: str | None = None) -> None:
        tracking.close_run(self.parent, status, reason)

    def tag(self, tags: dict[str, str]) -> None:
        tracking.set_tags(self.parent, tags)

    def mark_front(self) -> None:
        """Tag each complete trial's run as on the study's front or dominated, for the MLflow view (pqsweep.view)."""
        front = {t.number for t in self.front()}
        runs = {t.number: t.user_attrs.get(studies.RUN_ATTR)
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        view.mark_front([r for n, r in runs.items() if r and n in front],
                        [r for n, r in runs.items() if r and n not in front])

    def front(self) -> list[FrozenTrial]:
        """Optuna's best trials (the front), less those discarded."""
        try:
            best = self.study.best_trials
        except ValueError:
            return []
        return [t for t in best if not t.user_attrs.get(studies.DISCARD_ATTR)]


def _metrics(objectives: list[str]):
    from pqsweep.metrics import METRICS

    return [METRICS[name] for name in objectives]
