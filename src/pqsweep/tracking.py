"""MLflow's side of pqsweep: the store, one experiment per study with its view, and the lifecycle of runs (a study's
parent run, the trial runs the sweeper creates before it launches them, a single run's own). What a run writes into
its run (params, inputs, the baseline's run, the model) is pqsweep.records; pqsweep.trial drives a trial.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pqsweep.schema import StudyConfig
from pqsweep.stores import absolute_uri, prepare_tracking_store, sqlite_file
from pqsweep.view import share_view

log = logging.getLogger(__name__)

PARENT_ENV = "PQSWEEP_PARENT_RUN_ID"
resolve_uri = absolute_uri  # sqlite:///relative.db -> absolute, so every process of a sweep writes one store
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}

def connect(cfg: DictConfig) -> str:
    """Point mlflow at the configured store, creating a fresh SQLite one first; returns its URI."""
    uri = resolve_uri(cfg.tracking.uri)
    prepare_tracking_store(uri)  # a fresh SQLite store is created once, under a lock, before anyone writes to it
    mlflow.set_tracking_uri(uri)
    return uri


def setup(cfg: DictConfig) -> str:
    """Point mlflow at the configured store and experiment; returns the experiment id.

    A new experiment on a SQLite store keeps its artifacts in `mlartifacts/` beside the database file (MLflow's
    default is `./mlruns` under whatever directory the process happens to run in).
    """
    uri = connect(cfg)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            # the kind of experiment for the MLflow UIs that read it (training runs, not GenAI traces; 3.17's UI takes
            # it from a global switch instead, which ui_link's address sets)
            created = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                               tags=EXPERIMENT_TAGS | {"mlflow.note.content": description(cfg)})
            share_view(created, list(cfg.study.objectives))  # a sweep widens it with its swept keys
        except mlflow.exceptions.MlflowException:
            pass  # another process of the same sweep created it first
    return mlflow.set_experiment(cfg.tracking.experiment).experiment_id


def description(cfg: DictConfig) -> str:
    """The experiment's description, the experiments page's first words about it: a study's own experiment names
    its parent run; the default one (study.name unset, `adhoc`) holds single runs, sensitivity scans and
    command-line grids, each grid a study named after its swept keys, so it names no one parent run."""
    name = cfg.tracking.experiment
    if name == cfg.study.name != StudyConfig.name:
        return (f"Runs: click Model training (top left) once. The pqsweep study {name}: the link the sweep printed "
                f"opens its trials sorted by its first objective, their front tagged `pareto`, and a scatter of its "
                f"objectives under Chart; `pqsweep-report {name}` prints its table.")
    return ("Runs: click Model training (top left) once. Runs of pqsweep outside a named study: single runs, "
            "sensitivity scans, and command-line grids (each a study named after its swept keys, e.g. "
            "pruning.amount+quantization, with its parent run sweep-<that name>). `pqsweep-report --list` lists the "
            "grids, `pqsweep-report <name>` prints one's table.")


def log_batch(client: MlflowClient, run_id: str, params=None, metrics=None, tags=None) -> None:
    """MLflow takes at most 100 params per batch; send them in slices."""
    params = [Param(k, v) for k, v in (params or {}).items()]
    for start in range(0, max(len(params), 1), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in (metrics or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


@contextmanager
def task_run(run_name: str, tags: dict[str, str], run_id: str | None = None,
             system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one task: the run the sweeper created for it (`run_id`), else a new one, the child of the
    sweep's parent run when there is one. An exception inside is recorded as the run's `error` tag (start_run marks
    it FAILED); Ctrl-C and SIGTERM mark it KILLED, not a failure. `system_metrics`: MLflow samples the machine each
    second while the run is open (its default, every 10 s, would miss a short trial)."""
    if run_id is not None:
        client = MlflowClient()
        client.update_run(run_id, name=run_name)
        # its own experiment: a study resumed from a store of before one experiment per study keeps its first one
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        start = functools.partial(mlflow.start_run, run_id=run_id)
    else:
        start = functools.partial(mlflow.start_run, run_name=run_name, parent_run_id=os.environ.get(PARENT_ENV))
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    with start(tags=tags, log_system_metrics=system_metrics) as active:
        try:
            yield active
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise
        except Exception as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")  # the whole traceback, beside the one-line tag
            raise


# -- runs the sweeper owns: the study's parent run, and each trial's run before its job starts ------------------


def trial_tags(study: str, number: int | str | None = None, optuna: bool = False) -> dict[str, str]:
    """What marks a trial's run: its study (`sweep`) and, in a multirun, its number (Optuna's, for pqsweep's sweeper)."""
    tags = {"stage": "trial", "sweep": study}
    if number is not None:
        tags["trial_number"] = str(number)
    if optuna:
        tags |= {"optuna_study": study, "optuna_trial_number": str(number)}
    return tags


def create_parent(experiment_id: str, study: str, params: dict[str, str], tags: dict[str, str] | None = None) -> str:
    """A study's parent run, `sweep-<study>`, which its trials' runs are nested under."""
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=f"sweep-{study}",
                            tags={"stage": "sweep", "sweep": study, **(tags or {})})
    log_batch(client, run.info.run_id, params=params)
    return run.info.run_id


def masked(uri: str) -> str:
    """A URI as logs and tags show it: its password masked."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)


def experiment_holding(uri: str, run_id: str) -> str | None:
    """The experiment of store `uri` that holds run `run_id`; None when the store does not (a SQLite store that does
    not exist yet holds nothing, and is not created to find that out)."""
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        return None
    prepare_tracking_store(uri)
    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException:
        return None


def resume_run(run_id: str) -> None:
    """Mark an existing run RUNNING again (a resumed study's parent)."""
    MlflowClient().update_run(run_id, status="RUNNING")


def create_trial_run(experiment_id: str, parent_id: str, study: str, number: int, name: str) -> str:
    """A trial's run, made by the sweeper before it launches the trial, so the Optuna trial carries its id."""
    tags = {**trial_tags(study, number, optuna=True), "mlflow.parentRunId": parent_id}
    return MlflowClient().create_run(experiment_id, run_name=name[:250], tags=tags).info.run_id


def close_run(run_id: str | None, status: str, reason: str | None = None, replace: tuple[str, ...] = ()) -> None:
    """End a run that is still RUNNING (its job died, was interrupted, or the sweep ends); leave an ended one, unless
    its status is in `replace` (a run FAILED by the error a library raised in place of Ctrl-C was KILLED)."""
    if not run_id:
        return
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        tag = {"FAILED": "error", "KILLED": "interrupted"}.get(status, "note")
        if run.info.status not in ("RUNNING", status, *replace):
            return  # it ended otherwise on its own: that is the truth
        if reason and tag not in run.data.tags:  # why it ended: a failure's error, or what interrupted it
            client.set_tag(run_id, tag, reason[:5000])
        if run.info.status != status:
            client.set_terminated(run_id, status)
    except mlflow.exceptions.MlflowException as error:
        log.warning("could not close MLflow run %s as %s: %s", run_id, status, error)


def finished_metrics(run_id: str | None) -> dict[str, float] | None:
    """The metrics of a run that ended FINISHED, NaN ones left out; None for any other run (or none)."""
    if not run_id:
        return None
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    if run.info.status != "FINISHED":
        return None
    return {name: float(value) for name, value in run.data.metrics.items() if not math.isnan(value)}


def finished_values(run_id: str | None, names: list[str]) -> list[float] | None:
    """The run's metrics `names` when it ended FINISHED with all of them (a trial whose process died after its run
    ended but before the sweeper heard of it); else None."""
    metrics = finished_metrics(run_id)
    if metrics is None or not all(name in metrics for name in names):
        return None
    return [metrics[name] for name in names]


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    log_batch(MlflowClient(), run_id, tags=tags)


class ParentRunCallback(Callback):
    """One MLflow parent run per multirun of Hydra's other sweepers (basic): trials, in this process or launcher
    workers, log under it. pqsweep's own sweeper keeps the parent with its study (pqsweep.sweeper.ledger)."""

    @staticmethod
    def ours(config: DictConfig) -> bool:
        return OmegaConf.select(config, "hydra.sweeper._target_") == "pqsweep.sweeper.OptunaSweeper"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.ours(config):
            return
        sweeper = OmegaConf.select(config, "hydra.sweeper.params") or {}
        params = {f"sweeper.{k}": str(v) for k, v in sweeper.items()}
        params["sweeper"] = OmegaConf.select(config, "hydra.runtime.choices.hydra/sweeper") or "basic"
        params["objectives"] = ",".join(config.study.objectives)
        experiment_id = setup(config)
        run_id = create_parent(experiment_id, config.study.name, params)
        os.environ[PARENT_ENV] = run_id
        log.info("MLflow parent run %s (sweep %s) at %s", run_id, config.study.name, mlflow.get_tracking_uri())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_id = os.environ.pop(PARENT_ENV, None)
        if run_id:
            # Hydra calls this from a `finally`: an exception on its way out means the sweep did not finish.
            error = sys.exc_info()[1]
            status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            MlflowClient().set_terminated(run_id, status)
