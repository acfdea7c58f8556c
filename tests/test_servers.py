"""The team stores for real: an Optuna study on PostgreSQL and MLflow runs on `mlflow server`, shared by processes
the way workers on many machines share them, and scripts/team-stores.sh starting and stopping both."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from servers import free_port, install_postgres, mlflow_server, optuna_storage, postgres  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# A worker: adds two trials to the study (creating it if it is the first) and says how many the study holds.
WORKER = """
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name="shared", storage=sys.argv[1], load_if_exists=True)
study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
print(len(study.trials))
"""

# A worker's MLflow run: a param, a metric and an artifact, through nothing but the server's http URI.
LOGGER = """
import sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment(sys.argv[2])
with mlflow.start_run() as run:
    mlflow.log_param("pruning.amount", 0.5)
    mlflow.log_metric("top1", 0.93)
    mlflow.log_text("accuracy,0.93\\n", "results/table.csv")
print("run_id", run.info.run_id)  # MLflow prints its own lines about the run too
"""


def python(code: str, *args: str) -> str:
    """Run `code` in a new interpreter; returns its last line of output."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[-1]


def test_a_study_created_by_one_process_is_loaded_and_extended_by_another(optuna_storage):
    assert python(WORKER, optuna_storage) == "2"
    assert python(WORKER, optuna_storage) == "4"  # loaded the first one's study, not a new one

    study = optuna.load_study(study_name="shared", storage=optuna_storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_a_run_logged_by_another_process_is_read_back_with_its_artifact(mlflow_server, tmp_path):
    run_id = python(LOGGER, mlflow_server, "test_servers").removeprefix("run_id ")

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"pruning.amount": "0.5"} and run.data.metrics == {"top1": 0.93}
    # stored by the server (--serve-artifacts): a worker needs no shared folder, only the URI
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    local = client.download_artifacts(run_id, "results/table.csv", str(tmp_path))
    assert Path(local).read_text() == "accuracy,0.93\n"


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_team_stores_script_starts_both_stores_workers_use_them_and_stop_stops_them(tmp_path):
    install_postgres()
    script = REPO / "scripts" / "team-stores.sh"
    pg_port, mlflow_port = free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="team-stores-"))  # not under tmp_path: the postgres user must reach it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # this venv's mlflow
    stop = [str(script), "stop", "--dir", str(folder)]
    try:
        started = subprocess.run(
            [str(script), "start", "--dir", str(folder), "--pg-port", str(pg_port), "--mlflow-port", str(mlflow_port),
             "--", "--workers", "1"],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        storage, tracking = started.stdout.splitlines()
        assert storage.startswith("hydra.sweeper.storage=postgresql+psycopg://pqsweep:")
        assert storage.endswith(f"@127.0.0.1:{pg_port}/optuna")
        assert tracking == f"tracking.uri=http://127.0.0.1:{mlflow_port}"
        assert (folder / "urls").read_text().splitlines() == [storage, tracking]

        storage_url, tracking_uri = storage.split("=", 1)[1], tracking.split("=", 1)[1]
        assert python(WORKER, storage_url) == "2"
        run_id = python(LOGGER, tracking_uri, "team").removeprefix("run_id ")
        assert MlflowClient(tracking_uri).get_run(run_id).data.metrics == {"top1": 0.93}
        assert list((folder / "artifacts").rglob("table.csv"))  # the default artifact root: DIR/artifacts

        stopped = subprocess.run(stop, capture_output=True, text=True, timeout=120, env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert refused(pg_port) and refused(mlflow_port)
        assert not (folder / "mlflow.pid").exists() and not (folder / "pg" / "postmaster.pid").exists()
    finally:
        subprocess.run(stop, capture_output=True, timeout=120, env=env)  # a no-op when stopped above
        shutil.rmtree(folder, ignore_errors=True)
