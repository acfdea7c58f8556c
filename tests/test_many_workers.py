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

from faults import injects
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


@injects("a worker on another host dies while another still runs (PostgreSQL, heartbeat_interval=2)",
         "the living worker waits for the others' trials; once the lost one's heartbeat is 4 intervals old (8.2 s "
         "after the kill here) it fails that trial, KILLs its run and runs the point; the parent ends FINISHED",
         "the lost trial's partial work")
def test_a_worker_lost_on_another_host_is_found_by_its_heartbeat_and_its_point_run_by_another(
        optuna_storage, mlflow_server, tmp_path):
    """A worker on another machine dies mid-trial: no process of this host can tell, only its heartbeat stops. The
    living worker fails its trial once 4 heartbeat intervals have passed, KILLs its run and runs the point."""
    import re
    import signal
    import time
    from datetime import datetime

    pqsweep = Path(sys.executable).parent / "pqsweep"
    common = ["-m", "dataset=digits", "train.epochs=1", "train.finetune_epochs=3", "measure.warmup=1",
              "measure.repeats=2", "pruning=global_magnitude", f"pruning.amount={AMOUNTS}",
              f"hydra.sweeper.storage={optuna_storage}", "hydra.sweeper.heartbeat_interval=2",
              f"tracking.uri={mlflow_server}", f"tracking.experiment={tmp_path.name}", f"cache.dir={tmp_path}/cache"]
    logs = {name: tmp_path / f"{name}.log" for name in ("living", "lost")}
    workers = {}
    for name in ("living", "lost"):
        (tmp_path / name).mkdir()
        workers[name] = subprocess.Popen([str(pqsweep), *common], cwd=tmp_path / name, stdout=logs[name].open("w"),
                                         stderr=subprocess.STDOUT)
        time.sleep(2)
    try:
        deadline = time.monotonic() + 300
        while True:  # the workers create the study once their imports are done: seconds, more on a busy machine
            try:
                study = optuna.load_study(study_name="pruning.amount", storage=optuna_storage)
                break
            except KeyError:
                assert time.monotonic() < deadline, logs["lost"].read_text()[-2000:]
                time.sleep(0.2)
        while True:  # a trial of the lost worker in flight, which then says it runs on another host; with its MLflow
            # run made (a kill between its owner and its run leaves no run to KILL: a race of this test, not a fault)
            theirs = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                      if t.user_attrs.get("pqsweep.pid", "").startswith(f"{workers['lost'].pid}:")
                      and t.user_attrs.get("mlflow_run_id")]
            if theirs:
                break
            assert time.monotonic() < deadline and workers["lost"].poll() is None, logs["lost"].read_text()[-2000:]
            time.sleep(0.05)
        optuna.trial.Trial(study, theirs[0]._trial_id).set_user_attr("pqsweep.host", "another-host")
        workers["lost"].send_signal(signal.SIGKILL)
        lost = datetime.now()
        assert workers["living"].wait(timeout=600) == 0, logs["living"].read_text()[-3000:]
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
    living = logs["living"].read_text()
    found = re.findall(r"\[([\d-]+ [\d:,]+)\]\[HYDRA\] study pruning.amount: 1 trial left RUNNING", living)
    assert len(found) == 1, living[-3000:]
    (found,) = found
    seconds = (datetime.strptime(found, "%Y-%m-%d %H:%M:%S,%f") - lost).total_seconds()
    print(f"the lost worker's trial was failed {seconds:.1f} s after it died")
    assert 8 <= seconds < 60  # the grace period (4 x 2 s), then at most a trial of the living worker's own

    trials = optuna.load_study(study_name="pruning.amount", storage=optuna_storage).trials
    complete = collections.Counter(t.params["pruning.amount"] for t in trials if t.state == TrialState.COMPLETE)
    assert sorted(complete) == [float(a) for a in AMOUNTS.split(",")] and set(complete.values()) == {1}
    assert trials[theirs[0].number].state == TrialState.FAIL
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(tmp_path.name)
    (killed,) = client.search_runs([experiment.experiment_id], "attributes.status = 'KILLED'")
    assert killed.data.tags["interrupted"] == "its heartbeat stopped"
