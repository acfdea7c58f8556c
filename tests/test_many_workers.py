"""Many workers on one study, on existing engines: three `pqsweep -m` processes share a grid study in PostgreSQL
(Optuna's RDB storage) and log to one `mlflow server` backed by PostgreSQL, all on loopback. No scheduler: each
worker runs the same command and takes the grid points nobody has taken."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from servers import mlflow_server, optuna_storage, postgres  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

AMOUNTS = "0,0.3,0.5,0.7,0.9,0.95"


def test_three_workers_share_one_grid_and_every_point_ends_exactly_once(optuna_storage, mlflow_server, tmp_path):
    pqsweep = Path(sys.executable).parent / "pqsweep"
    common = ["-m", "dataset=digits", "train.epochs=1", "train.finetune_epochs=0", "measure.warmup=1",
              "measure.repeats=2", "pruning=global_magnitude", f"pruning.amount={AMOUNTS}",
              f"hydra.sweeper.storage={optuna_storage}", f"tracking.uri={mlflow_server}",
              f"tracking.experiment={tmp_path.name}",  # the server is shared by the whole session
              f"cache.dir={tmp_path}/cache"]  # shared on purpose, as a shared file system would be
    workers = []
    for i in range(3):
        (tmp_path / f"w{i}").mkdir()
        log = (tmp_path / f"w{i}.log").open("w")
        workers.append(subprocess.Popen([str(pqsweep), *common], cwd=tmp_path / f"w{i}", stdout=log,
                                        stderr=subprocess.STDOUT))
    try:
        codes = [w.wait(timeout=900) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(3)]
    assert codes == [0, 0, 0], "\n".join(log[-2000:] for log in logs)

    trials = optuna.load_study(study_name="pruning.amount", storage=optuna_storage).trials
    complete = collections.Counter(t.params["pruning.amount"] for t in trials if t.state == TrialState.COMPLETE)
    assert sorted(complete) == [float(a) for a in AMOUNTS.split(",")] and set(complete.values()) == {1}
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all("study pruning.amount in postgresql" in log for log in logs)  # each worker joined the one study

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(tmp_path.name)
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'trial'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(float(r.data.params["pruning.amount"]) for r in finished) == sorted(complete)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (parent,) = client.search_runs([experiment.experiment_id], "tags.stage = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert len(client.search_runs([experiment.experiment_id], "tags.stage = 'baseline'")) == 1
