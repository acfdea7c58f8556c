"""Faults a run meets, injected for real, and what is left recorded: a trial that diverges fails with one line and
is never a result; a cache entry under another's name is not trusted. (The study's faults, signals and dead
workers, are in test_study.py; broken cache files in test_cache_integrity.py; every @injects test makes an item of
the list of faults in docs/studies.md.)"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from pqsweep import pipeline
from pqsweep.train import Diverged

from faults import injects, table
from nets import stage_entry, stage_path

FAST = ("dataset.num_samples=200", "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=0",
        "measure.repeats=2")


@injects("a baseline that diverges (train.optimizer.lr=1e9)",
         "the trial fails with one line naming the phase, epoch and step; the baseline is recorded as diverged, so "
         "every later trial that needs it fails at once with the same line",
         "nothing: no result is cached or reported for it")
def test_a_diverged_baseline_fails_its_trial_in_one_line_and_every_later_trial_at_once(make_cfg):
    cfg = make_cfg(*FAST, "train.optimizer.lr=1e9")
    with pytest.raises(Diverged, match=r"^baseline: the loss was nan at epoch 1 of 1, step \d+; lower the "):
        pipeline.run(cfg)
    assert set(stage_entry(cfg, "baseline")) == {"failed", "key"}  # a record of the failure, no weights
    assert not stage_path(cfg, "baseline_metrics").exists()
    started = time.monotonic()
    with pytest.raises(Diverged, match=r"recorded as baseline [0-9a-f]{16} in .*: these settings diverge"):
        pipeline.run(make_cfg(*FAST, "train.optimizer.lr=1e9", "quantization=fp16"))  # another trial, same baseline
    assert time.monotonic() - started < 5  # trained nothing


@injects("a fine-tune that diverges (train.finetune_lr=1e9)",
         "the trial fails with one line (the fine-tuning phase); its prune stage is recorded as diverged; the "
         "baseline stays cached for the trials that fine-tune otherwise",
         "nothing")
def test_a_diverged_fine_tune_fails_its_prune_stage_and_keeps_the_baseline(make_cfg):
    cfg = make_cfg(*FAST, "pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_lr=1e9")
    with pytest.raises(Diverged, match=r"^finetune: the loss was (nan|inf) at epoch 1 of 1"):
        pipeline.run(cfg)
    assert "failed" in stage_entry(cfg, "prune") and "state_dict" in stage_entry(cfg, "baseline")
    good = pipeline.run(make_cfg(*FAST, "pruning=global_magnitude", "pruning.amount=0.5"))
    assert good.baseline.cached is True and good.stages_cached["prune"] is False


def test_weights_left_non_finite_by_training_fail_it_though_the_loss_stayed_finite():
    from torch import nn

    from nets import compose_cfg
    from pqsweep.train import fit

    model = nn.Linear(4, 2)
    model.register_parameter("spare", nn.Parameter(torch.tensor([float("nan")])))  # trains, but no loss sees it
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    with pytest.raises(Diverged, match=r"^probe: spare holds non-finite values after 1 epoch; lower the "):
        fit(model, data, compose_cfg().train, 1, desc="probe")


@injects("a cache entry copied over another key's file (a synced or hand-copied cache folder)",
         "the entry names the key it was saved under: it is moved aside with one warning and computed again",
         "the time to compute it again")
def test_an_entry_saved_under_another_key_is_not_trusted(make_cfg, caplog):
    first = make_cfg(*FAST)
    other = make_cfg(*FAST, "train.seed=1")
    pipeline.run(first)
    pipeline.run(other)
    shutil.copy(stage_path(other, "baseline"), stage_path(first, "baseline"))  # another baseline under this name
    caplog.set_level("WARNING", logger="pqsweep.cache")
    again = pipeline.run(first)
    assert again.baseline.cached is False  # trained again, not the other seed's weights
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "pqsweep.cache"]
    assert f"holds the entry of key {stage_path(other, 'baseline').stem.split('-')[1]}" in warning
    assert stage_entry(first, "baseline")["key"] == stage_path(first, "baseline").stem.split("-")[1]


def test_the_docs_fault_list_is_the_injecting_tests():
    page = (Path(__file__).resolve().parents[1] / "docs" / "studies.md").read_text()
    assert table() in page, "docs/studies.md's list of faults: paste `python tests/faults.py`"


@pytest.mark.slow
@injects("a sweep whose grid holds a learning rate that diverges",
         "those trials are FAILED in Optuna and MLflow with the diverged line (the second at once, from the record), "
         "listed as failed in the report and on no front; the sweep exits 1",
         "nothing")
def test_a_sweep_records_its_diverged_trials_as_failed_and_keeps_them_off_the_front(tmp_path):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from nets import experiment_ids

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "-m", "pqsweep.cli", "-m", "train.optimizer.lr=0.001,1e9", "quantization=none,fp16",
               "dataset=digits", "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=0", "measure.repeats=2",
               "study.name=nan", "study.objectives=[top1,size_gzip_mb]", f"tracking.uri={uri}",
               f"cache.dir={tmp_path}/cache"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    client = MlflowClient(uri)
    trials = client.search_runs(experiment_ids(client), "tags.stage = 'trial'")
    failed = [t for t in trials if t.info.status == "FAILED"]
    assert sorted(t.data.params["train.optimizer.lr"] for t in failed) == ["1000000000.0"] * 2
    assert all(t.data.tags["error"].startswith("Diverged: baseline: the loss was nan") for t in failed)
    assert sum("recorded as baseline" in t.data.tags["error"] for t in failed) == 1  # the second: at once
    assert all(not t.data.metrics for t in failed)  # nothing measured, nothing to put on a front
    report = subprocess.run([sys.executable, "-m", "pqsweep.reports.report", "nan", "--uri", uri, "--no-plots",
                             "--no-log"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    rows = [line for line in report.stdout.splitlines() if line.rstrip().endswith(("FINISHED", "FAILED"))]
    assert len(rows) == 4 and [row.rstrip().endswith("FAILED") for row in rows].count(True) == 2
    assert all("*" not in row for row in rows if row.rstrip().endswith("FAILED"))
    assert "2 trials failed: see their `error` tag" in report.stderr


# --- stores that survive signals -----------------------------------------------------------------------------------

CREATING = "A new study created"  # Optuna's line: the study exists; its claim, identity, store, parent and readiness follow
SWEEP = ["-m", "dataset=digits", "train.epochs=0", "measure.warmup=0", "measure.repeats=2", "pruning=global_magnitude",
         "pruning.amount=0,0.5", "study.name=k"]


def pqsweep_command(folder: Path, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "pqsweep.cli", *args, f"tracking.uri=sqlite:///{folder}/mlflow.db",
            f"cache.dir={folder}/cache"]


def stopped_while_creating(folder: Path, delay: float, sig) -> str:
    """Start a first sweep on a fresh folder, send `sig` `delay` seconds after Optuna made its study (then come its
    claim, its identity, the MLflow store, the parent run and the study's readiness); returns what it printed."""
    import subprocess

    process = subprocess.Popen(pqsweep_command(folder, *SWEEP), cwd=folder, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    printed = []
    for line in process.stderr:
        printed.append(line)
        if CREATING in line:
            break
    time.sleep(delay)
    process.send_signal(sig)
    printed += process.stderr.readlines()
    process.wait(timeout=120)
    return "".join(printed)


def assert_usable(folder: Path) -> None:
    """No store, or a whole one: pqsweep's preparation takes it and MLflow logs to it; the study, if made, is ready
    or its creator is gone (taken over at once)."""
    from mlflow.tracking import MlflowClient
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from pqsweep.stores import prepare_tracking_store
    from pqsweep.sweeper import study as studies

    uri = f"sqlite:///{folder}/mlflow.db"
    prepare_tracking_store(uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment(f"probe-{time.monotonic_ns()}"))
    client.set_terminated(run.info.run_id)
    assert not list(folder.glob(".mlflow.db.creating-*"))  # what a killed creator left, removed
    if (folder / "optuna.journal").exists():
        storage = JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))
        for summary in storage.get_all_studies():  # ready, its creator gone, or never claimed (killed in the
            attrs = summary.user_attrs  # milliseconds between Optuna's creation and the claim: taken over after 2 s)
            creator = attrs.get(studies.CREATOR_ATTR)
            assert attrs.get(studies.READY_ATTR) or creator is None or studies.process_gone(creator)


@pytest.mark.slow
@injects("SIGKILL of a first sweep while it creates the MLflow store and the study (20 moments across the window)",
         "the store is whole or absent (built aside, then linked in); a study left unready by its dead creator is "
         "taken over at once by the next command",
         "nothing: the next command starts over")
def test_a_kill_anywhere_in_the_creation_window_leaves_no_store_or_a_whole_one(tmp_path):
    import signal
    import subprocess

    for i, delay in enumerate(0.08 * k for k in range(20)):  # 0 to 1.5 s after the study is made: its store, parent
        folder = tmp_path / f"kill-{i}"
        folder.mkdir()
        stopped_while_creating(folder, delay, signal.SIGKILL)
        assert_usable(folder)
    started = time.monotonic()  # the last folder: its sweep is run to the end by the same command
    done = subprocess.run(pqsweep_command(folder, *SWEEP), cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 grid points, 2 done, 0 to run" in done.stdout + done.stderr and time.monotonic() - started < 60


@pytest.mark.slow
@injects("Ctrl-C of a first sweep while it creates the MLflow store and the study",
         "one line (`pqsweep: interrupted`), exit 130; the store is whole or absent",
         "nothing")
def test_ctrl_c_in_the_creation_window_is_one_line_and_leaves_a_whole_store(tmp_path):
    import signal

    for i, delay in enumerate((0.0, 0.15, 0.3, 0.5, 0.8)):
        folder = tmp_path / f"interrupt-{i}"
        folder.mkdir()
        printed = stopped_while_creating(folder, delay, signal.SIGINT)
        assert "Traceback" not in printed, printed[-3000:]
        assert printed.rstrip().splitlines()[-1].startswith(("pqsweep: interrupted", "[")), printed[-2000:]
        assert_usable(folder)


@pytest.mark.slow
@injects("another MLflow client (the UI, a notebook) creates the same fresh store at the same moment",
         "the sweep waits for that client's store and goes on; neither fails",
         "nothing")
def test_a_foreign_mlflow_client_creating_the_store_at_the_same_moment_is_waited_for(tmp_path):
    import subprocess
    import sys

    for i in range(4):
        folder = tmp_path / f"foreign-{i}"
        folder.mkdir()
        foreign = [sys.executable, "-c", "import time, mlflow; time.sleep(%.2f); "
                   "mlflow.MlflowClient('sqlite:///%s/mlflow.db').search_experiments()" % (0.5 * i, folder)]
        theirs = subprocess.Popen(foreign, stderr=subprocess.PIPE, text=True)
        ours = subprocess.run(pqsweep_command(folder, *SWEEP), cwd=folder, capture_output=True, text=True,
                              timeout=600)
        assert theirs.wait(timeout=120) == 0, theirs.stderr.read()[-2000:]
        assert ours.returncode == 0, ours.stderr[-3000:]


# --- permission faults: an immutable file or folder (chattr +i), which even root cannot write -------------------

@pytest.fixture
def immutable():
    """chattr +i on what a test names, chattr -i after it; skipped where the file system or the container has no
    immutable attribute (root passes plain permission bits, so they cannot make the fault)."""
    import subprocess

    made = []

    def make(path: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


@injects("a read-only MLflow store (mlflow.db immutable)",
         "refused in one line naming tracking.uri and the file, before anything runs",
         "nothing: no run is written")
def test_a_store_that_cannot_be_written_is_refused_in_one_line(tmp_path, immutable):
    import subprocess

    from pqsweep.stores import prepare_tracking_store

    prepare_tracking_store(f"sqlite:///{tmp_path}/mlflow.db")
    immutable(tmp_path / "mlflow.db")
    done = subprocess.run(pqsweep_command(tmp_path, "dataset=digits", "train.epochs=0"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"pqsweep: error: tracking.uri=sqlite:///{tmp_path}/mlflow.db is not allowed: must be a "
                           f"SQLite store pqsweep can write ({tmp_path}/mlflow.db cannot be written (Operation not")


@pytest.mark.slow
@injects("the sweep's output folder made read-only mid-sweep",
         "the sweep stops with one line; the trial in flight and the parent run end FAILED, none RUNNING; the same "
         "command resumes it once the folder is writable",
         "the trials that had not started")
def test_an_output_folder_that_turns_read_only_mid_sweep_ends_the_sweep_in_one_line(tmp_path, immutable):
    import subprocess

    from mlflow.tracking import MlflowClient

    from nets import experiment_ids

    grid = ["-m", "dataset=digits", "train.epochs=0", "measure.warmup=0", "measure.repeats=2",
            "pruning=random", "pruning.amount=0,0.3,0.5,0.7", f"hydra.sweep.dir={tmp_path}/multirun"]
    process = subprocess.Popen(pqsweep_command(tmp_path, *grid), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    printed = []
    for line in process.stdout:  # the first trial has ended: its folder is made, the next ones are not
        printed.append(line)
        if "trial 1/4" in line:
            immutable(tmp_path / "multirun")
            break
    printed += process.stdout.readlines()
    assert process.wait(timeout=300) == 1
    errors = [line for line in printed if line.startswith("pqsweep: error:")]
    assert len(errors) == 1 and "the sweep stopped" in errors[0] and "Traceback" not in "".join(printed)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [r for r in client.search_runs(experiment_ids(client), "") if r.info.status == "RUNNING"] == []
    (parent,) = client.search_runs(experiment_ids(client), "tags.stage = 'sweep'")
    assert parent.info.status == "FAILED"
