"""Trials left RUNNING by a dead process, settled from what their MLflow runs recorded: a run that ended FINISHED with
its objectives makes its trial COMPLETE (the process died between the run's end and the sweeper's tell, so the
point is not rerun), any other is failed and its run KILLED. Real journal and MLflow stores; a real dead PID."""

from __future__ import annotations

import math
import subprocess
import sys

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from pqsweep.sweeper import study as studies
from pqsweep import tracking


@pytest.fixture
def stores(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.set_experiment("reap").experiment_id
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    return study, experiment


def dead_owner() -> dict[str, str]:
    """Owner attributes of a process of this host that has exited (its PID no longer has that start time)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = studies.process_start(child.pid)
    child.wait()
    return {studies.HOST_ATTR: studies.owner()[studies.HOST_ATTR], studies.PID_ATTR: f"{child.pid}:{started}"}


def orphan(study, experiment, amount: float, metrics: dict[str, float], status: str | None, alive: bool = False):
    """A RUNNING trial of `amount` whose MLflow run logged `metrics` and ended `status` (None: still RUNNING)."""
    trial = study.ask()
    client = MlflowClient()
    run = client.create_run(experiment, run_name=f"amount={amount}")
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    if status:
        client.set_terminated(run.info.run_id, status)
    for key, value in (studies.owner() if alive else dead_owner()).items():
        trial.set_user_attr(key, value)
    trial.set_user_attr(studies.RUN_ATTR, run.info.run_id)
    return trial.number, run.info.run_id


def settle(study):
    objectives = ["top1", "size_mb"]
    closed = []

    def on_stale(trial, reason):
        closed.append(trial.number)
        tracking.close_run(trial.user_attrs[studies.RUN_ATTR], "KILLED", reason)

    result = studies.reap(study, on_stale,
                          lambda trial: tracking.finished_values(trial.user_attrs.get(studies.RUN_ATTR), objectives))
    return result, closed


def test_a_trial_whose_run_finished_with_its_objectives_is_complete_and_the_others_fail(stores):
    study, experiment = stores
    done, done_run = orphan(study, experiment, 0.5, {"top1": 0.91, "size_mb": 0.4}, "FINISHED")
    half, half_run = orphan(study, experiment, 0.7, {"top1": 0.88}, "FINISHED")  # size_mb never logged
    nan, _ = orphan(study, experiment, 0.8, {"top1": math.nan, "size_mb": 0.3}, "FINISHED")
    failed, _ = orphan(study, experiment, 0.9, {"top1": 0.5, "size_mb": 0.2}, "FAILED")
    running, running_run = orphan(study, experiment, 0.3, {"top1": 0.9}, None)
    ours, ours_run = orphan(study, experiment, 0.1, {}, None, alive=True)  # this process: still in flight

    (completed, failed_count), closed = settle(study)

    trials = {t.number: t for t in study.get_trials()}
    assert (completed, failed_count) == (1, 4)
    assert trials[done].state == TrialState.COMPLETE and trials[done].values == [0.91, 0.4]
    assert "is gone" in trials[done].user_attrs[studies.RECOVERED_ATTR]
    for number in (half, nan, failed, running):
        assert trials[number].state == TrialState.FAIL
        assert "is gone" in trials[number].user_attrs[studies.ERROR_ATTR]
    assert sorted(closed) == sorted([half, nan, failed, running])
    assert trials[ours].state == TrialState.RUNNING
    client = MlflowClient()
    assert client.get_run(done_run).info.status == "FINISHED"  # its truth stands
    assert client.get_run(half_run).info.status == "FINISHED"  # ended on its own: not rewritten
    killed = client.get_run(running_run)
    assert killed.info.status == "KILLED" and "is gone" in killed.data.tags["interrupted"]
    assert client.get_run(ours_run).info.status == "RUNNING"

    assert settle(study) == ((0, 0), [])  # settled once: a second look changes nothing
