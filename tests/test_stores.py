"""A fresh SQLite tracking store opened by several processes at the same instant keeps every run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pqsweep import stores
from pqsweep.stores import absolute_uri, prepare_tracking_store, sqlite_file

# One trial's first contact with the store. Imports come before the barrier (they take a second or two, and not
# the same in every process); after it, the processes hit the fresh store within a millisecond of one another.
WORKER = """
import sys, time
from pathlib import Path
import mlflow
from pqsweep.stores import prepare_tracking_store
uri, go, ready, prepare = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
if prepare == "1":
    prepare_tracking_store(uri)
mlflow.set_tracking_uri(uri)
with mlflow.start_run():
    mlflow.log_metric("top1", 1.0)
"""


def race(directory: Path, processes: int = 4, prepare: bool = True) -> list[subprocess.CompletedProcess]:
    """`processes` workers released together on a fresh store in `directory`; their completed processes.

    Without the lock (`prepare=False`, by hand) every one of 30 rounds on a 2-core machine lost runs, 101 of 120 in
    all ("duplicate column name: step", alembic's "Online migration expected to match one row", "table
    _alembic_tmp_tags already exists"), and 11 of the 30 stores were left half-migrated, unusable by any later run.
    """
    uri, go = f"sqlite:///{directory}/mlflow.db", directory / "go"
    ready = [directory / f"ready-{i}" for i in range(processes)]
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, uri, str(go), str(r), str(int(prepare))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    finished = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        finished.append(subprocess.CompletedProcess(worker.args, worker.returncode, out, err))
    return finished


def recorded_runs(uri: str) -> int:
    return len(MlflowClient(tracking_uri=uri).search_runs(["0"]))


@pytest.mark.slow  # four processes that import mlflow: ~10 s on two cores
def test_processes_that_open_a_fresh_store_together_all_log_their_run(tmp_path):
    finished = race(tmp_path)
    for worker in finished:
        assert worker.returncode == 0, worker.stderr
        for symptom in ("alembic", "duplicate column", "Traceback", "out-of-date"):
            assert symptom not in worker.stderr, worker.stderr
    assert recorded_runs(f"sqlite:///{tmp_path}/mlflow.db") == 4


def test_preparing_an_existing_store_changes_nothing_and_takes_no_lock(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepare_tracking_store(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id="0"):  # the Default experiment: not an earlier test's active one
        pass
    (tmp_path / "mlflow.db.lock").unlink()
    prepare_tracking_store(uri)
    assert recorded_runs(uri) == 1
    assert not (tmp_path / "mlflow.db.lock").exists()  # at the current schema: parallel trials do not queue


def test_a_relative_uri_names_the_file_under_the_working_directory(tmp_path):
    # (conftest runs every test in its own tmp_path)
    prepare_tracking_store("sqlite:///stores/relative.db")
    assert (tmp_path / "stores" / "relative.db").is_file() and (tmp_path / "stores" / "relative.db.lock").is_file()
    assert absolute_uri("sqlite:///stores/relative.db") == f"sqlite:///{tmp_path.resolve()}/stores/relative.db"


def test_other_stores_are_left_alone(tmp_path):
    for uri in ("http://localhost:5000", "databricks", "sqlite://", "sqlite:///:memory:", f"file://{tmp_path}/mlruns"):
        assert sqlite_file(uri) is None
        prepare_tracking_store(uri)  # connects to nothing, creates nothing
    assert list(tmp_path.iterdir()) == []
    assert absolute_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert sqlite_file(f"sqlite:///{tmp_path}/a.db?timeout=30") == tmp_path.resolve() / "a.db"


def test_a_new_experiment_opens_in_the_ui_as_training_runs_not_genai(make_cfg, tmp_path):
    from pqsweep import tracking

    cfg = make_cfg()
    experiment_id = tracking.setup(cfg)
    tags = MlflowClient().get_experiment(experiment_id).tags
    # the runs-table kind, for the MLflow UIs that read it (3.17's own takes the view from its global switch: test_ui)
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "mlflow.sharedViewState.pqsweep" in tags  # the view its link opens (test_tracking)
    assert "click Model training" in tags["mlflow.note.content"]  # the experiments page's Description column


@pytest.mark.parametrize("overrides, name", [
    ([], "cnn·fp32"),
    (["pruning=global_magnitude", "pruning.amount=0.9", "quantization=static_int8"], "cnn·gm0.9·int8"),
    (["model=resnet18_cifar", "pruning=structured_unstructured", "pruning.structured=0.5", "pruning.unstructured=0.3",
      "quantization=fp16", "train.seed=2"], "resnet18_cifar·su0.5+0.3·fp16·s2"),
    (["quantization=fake_quant", "quantization.bits_w=4", "quantization.bits_a=8"], "cnn·fq4a8"),
])
def test_a_run_is_named_by_its_whole_method_in_short(overrides, name):
    from nets import compose_cfg

    from pqsweep.records import run_name

    assert run_name(compose_cfg(*overrides)) == name


def test_a_store_that_cannot_be_read_is_never_taken_for_a_half_made_one(tmp_path, monkeypatch):
    # Under load a store with runs read as locked (or left with a killed writer's journal) looked empty, and was moved
    # aside after STALE seconds: the runs of a study's first command went with it (seen in a CI run).

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    run = client.create_run(client.create_experiment("kept")).info.run_id
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                               "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(stores, "STALE", 0.5)
        monkeypatch.setattr(stores, "WAIT", 3.0)
        stores._PREPARED.clear()
        with pytest.raises(stores.StoreError, match=r"the store cannot be read \(locked, or left mid-write\); "
                                                     r"nothing was changed"):
            stores.prepare_tracking_store(f"sqlite:///{db}")
    finally:
        holder.kill()
        holder.wait()
    assert not list(tmp_path.glob("mlflow.db.broken-*"))
    assert MlflowClient(f"sqlite:///{db}").get_run(run).info.run_id == run
