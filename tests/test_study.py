"""Studies under real faults: `pqsweep -m` as a subprocess, SIGKILL / SIGINT / SIGTERM sent for real, failing trials
that fail for real, and the study and the MLflow store read back afterwards."""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from faults import injects
from nets import experiment_ids

pytestmark = pytest.mark.slow

TINY = ["dataset=digits", "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=1", "measure.repeats=2",
        "measure.top5=false"]
GRID = ["pruning=global_magnitude", "pruning.amount=0,0.5,0.7", "quantization=none,fp16"]  # 6 points
GRID_NAME = "pruning.amount+quantization"


def command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pqsweep.cli", "-m", *TINY, *args,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache"]


def sweep(tmp_path: Path, *args: str, rc: int = 0) -> str:
    done = subprocess.run(command(tmp_path, *args), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == rc, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def interrupted(tmp_path: Path, *args: str, sig: int, after: int = 1, timeout: float = 300) -> int:
    """Start a sweep, send `sig` while a trial runs (after `after` trials finished), return its exit code."""
    log = (tmp_path / "interrupted.log").open("w")
    process = subprocess.Popen(command(tmp_path, *args), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (tmp_path / "interrupted.log").read_text()
        # ": top1 " is a run's own log line when it ends; the sweep's progress line after it reads "· top1 "
        finished, launched = text.count(": top1 "), text.count("Launching ")
        if finished >= after and launched > finished and "baseline_metrics" in text.rsplit("Launching ", 1)[1]:
            break  # a trial is in flight: its baseline was loaded and it is being measured or fine-tuned
        assert process.poll() is None, text[-3000:]
        time.sleep(0.05)
    process.send_signal(sig)
    return process.wait(timeout=120)


def study(tmp_path: Path, name: str = GRID_NAME) -> optuna.Study:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def runs(tmp_path: Path, stage: str) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = experiment_ids(MlflowClient())
    return MlflowClient().search_runs(experiments, f"tags.stage = '{stage}'", max_results=1000)


def point(trial) -> tuple:
    return tuple(sorted(trial.params.items()))


def assert_whole(tmp_path: Path, points: int, name: str = GRID_NAME) -> None:
    """Every point COMPLETE exactly once, one FINISHED trial run per point, nothing RUNNING, one FINISHED parent."""
    stored = study(tmp_path, name)
    assert stored.metric_names == ["top1"]  # the objectives, by name
    trials = stored.trials
    complete = collections.Counter(point(t) for t in trials if t.state == TrialState.COMPLETE)
    assert len(complete) == points and set(complete.values()) == {1}
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    trial_runs = runs(tmp_path, "trial")
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert len(finished) == points
    assert len({r.data.tags["optuna_trial_number"] for r in finished}) == points
    assert not [r for r in trial_runs if r.info.status == "RUNNING"]
    (parent,) = runs(tmp_path, "sweep")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
    by_number = {t.number: t for t in trials}
    for run in trial_runs:  # each run names its trial, and the trial its run
        trial = by_number[int(run.data.tags["optuna_trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna_study"] == name
        assert (run.info.status == "FINISHED") == (trial.state == TrialState.COMPLETE)


@injects('SIGKILL of a sweep while a trial runs',
         'the trial stays RUNNING; the same command fails it (its run KILLED, its PID gone), or completes it from its FINISHED run, and runs only the missing points',
         "the killed trial's partial work")
def test_sigkill_mid_grid_then_the_same_command_finishes_it_and_a_rerun_adds_nothing(tmp_path):
    args = [*GRID, "train.finetune_epochs=4"]
    assert interrupted(tmp_path, *args, sig=signal.SIGKILL) == -signal.SIGKILL
    before = study(tmp_path).trials
    assert any(t.state == TrialState.RUNNING for t in before)  # what the dead process left

    output = sweep(tmp_path, *args)
    assert_whole(tmp_path, 6)
    killed = [r for r in runs(tmp_path, "trial") if r.info.status == "KILLED"]
    recovered = [t for t in study(tmp_path).trials if "pqsweep.recovered" in t.user_attrs]
    if recovered:  # the kill fell between the trial's run ending FINISHED and the sweeper's tell: kept, not rerun
        assert "had finished their run: COMPLETE from its metrics" in output and not killed
    else:
        assert "left RUNNING by a dead process" in output
        assert len(killed) == 1 and "is gone" in killed[0].data.tags["interrupted"]
    assert output.count("baseline 1") <= 6  # the rerun trained no second baseline
    assert "not in cache, training" not in output

    n_trials = len(study(tmp_path).trials)
    start = time.monotonic()
    again = sweep(tmp_path, *args)
    seconds = time.monotonic() - start
    print(f"finished-grid rerun: {seconds:.1f} s")
    assert "Launching" not in again and "6 grid points, 6 done, 0 to run" in again
    assert len(study(tmp_path).trials) == n_trials and len(runs(tmp_path, "trial")) == 6 + len(killed)
    assert_whole(tmp_path, 6)


@injects('SIGKILL of a TPE search midway',
         'the same command tops the study up to n_trials COMPLETE trials',
         "the killed trial's partial work")
def test_a_budgeted_study_killed_midway_tops_up_to_n_trials(tmp_path):
    args = ["hydra/sweeper/sampler=tpe", "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.n_startup_trials=2",
            "pruning=global_magnitude", "pruning.amount=interval(0,0.9)", "study.name=tpe"]
    assert interrupted(tmp_path, *args, sig=signal.SIGKILL, after=3) == -signal.SIGKILL
    done_before = sum(t.state == TrialState.COMPLETE for t in study(tmp_path, "tpe").trials)
    assert 3 <= done_before < 6

    sweep(tmp_path, *args)
    trials = study(tmp_path, "tpe").trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    sweep(tmp_path, *args)  # topped up already: nothing more
    assert sum(t.state == TrialState.COMPLETE for t in study(tmp_path, "tpe").trials) == 6


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@injects('Ctrl-C or SIGTERM during a trial',
         'the trial FAILs in Optuna and is KILLED in MLflow, as is the parent; exit 130 / 143; the next command resumes',
         "the interrupted trial's partial work")
def test_an_interrupt_kills_the_trial_in_flight_and_the_next_run_resumes(tmp_path, sig):
    args = [*GRID[:2], "pruning.amount=0,0.5,0.7", "train.finetune_epochs=4"]
    assert interrupted(tmp_path, *args, sig=sig) == 128 + sig

    name = "pruning.amount"
    trials = study(tmp_path, name).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    (stopped,) = [t for t in trials if t.state == TrialState.FAIL]
    assert stopped.user_attrs["pqsweep.error"] == f"interrupted by {sig.name}"
    (parent,) = runs(tmp_path, "sweep")
    assert parent.info.status == "KILLED"
    statuses = collections.Counter(r.info.status for r in runs(tmp_path, "trial"))
    assert statuses["KILLED"] == 1 and statuses["RUNNING"] == 0 and statuses["FAILED"] == 0
    (killed,) = [r for r in runs(tmp_path, "trial") if r.info.status == "KILLED"]
    assert killed.info.run_id == stopped.user_attrs["mlflow_run_id"]

    sweep(tmp_path, *args)
    assert_whole(tmp_path, 3, name)


def write_layer_amounts(tmp_path: Path) -> dict[str, str]:
    """Per-layer amounts for the small CNN (its prunable layers are 0, 3, 8, 10), and a file naming a layer it
    does not have: that trial fails for real, inside the run, after its baseline loaded."""
    files = {"good1": '"0": 0.3\n', "good2": '"3": 0.5\n', "bad": "conv9: 0.5\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return {name: str(tmp_path / f"{name}.yaml") for name in files}


@pytest.mark.parametrize("order", [("bad", "good1", "good2"), ("good1", "bad", "good2"), ("good1", "good2", "bad")],
                         ids=["first", "middle", "last"])
@injects('a trial that raises (a layer the model lacks), first, middle or last',
         'FAILED with its error in one line; the sweep goes on and exits 1; the next command retries only that point',
         'nothing')
def test_a_failing_point_anywhere_in_the_grid_never_ends_the_sweep(tmp_path, order):
    files = write_layer_amounts(tmp_path)
    grid = ["pruning=layer_magnitude", "pruning.layer_amounts=" + ",".join(files[name] for name in order)]
    output = sweep(tmp_path, *grid, rc=1)
    assert "this run: 2 finished, 1 failed, 0 killed" in output
    assert "no prunable layer named conv9" in output.split("this run:")[1]
    # one progress line per trial: how far, its point, its objective or failure, its time, the time left
    lines = re.findall(r"trial (\d)/3 · layer_amounts=\S+ · (top1 [\d.]+|FAILED \(.+\)) · \d+ s( · ~[\d.]+ (?:s|min) left)?",
                       output)
    assert [int(n) for n, _, _ in lines] == [1, 2, 3] and [bool(left) for _, _, left in lines] == [True, True, False]
    assert [result.startswith("FAILED") for _, result, _ in lines] == [name == "bad" for name in order]
    statuses = sorted(r.info.status for r in runs(tmp_path, "trial"))
    assert statuses == ["FAILED", "FINISHED", "FINISHED"]
    (parent,) = runs(tmp_path, "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_failed"] == "1"
    states = sorted(t.state.name for t in study(tmp_path, "pruning.layer_amounts").trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]

    # The next run retries only the failed point; the old behaviour's exit code is a switch away.
    again = sweep(tmp_path, *grid, "hydra.sweeper.fail_on_failed_trials=false")
    assert again.count("Launching ") == 1 and "this run: 0 finished, 1 failed" in again
    assert "trial 1/1 · layer_amounts=" in again  # a resumed grid counts only what is left to run


@injects('more failures than hydra.sweeper.max_failures',
         'the sweep stops, its parent FAILED',
         'nothing: the next command runs what is left')
def test_a_spent_failure_budget_stops_the_sweep(tmp_path):
    files = write_layer_amounts(tmp_path)
    grid = ["pruning=layer_magnitude", f"pruning.layer_amounts={files['bad']},{files['good1']},{files['good2']}",
            "hydra.sweeper.max_failures=1"]
    output = sweep(tmp_path, *grid, rc=1)
    assert "stopping, 1 of 1 trial failed" in output and output.count("Launching ") == 1
    (parent,) = runs(tmp_path, "sweep")
    assert parent.info.status == "FAILED"


@injects('the same study with a setting changed',
         'refused in one line naming the setting, both values and study.name=',
         'nothing: no store is written')
def test_a_changed_fixed_setting_is_refused_and_nothing_is_touched(tmp_path):
    sweep(tmp_path, "pruning=global_magnitude", "pruning.amount=0,0.5")
    journal = (tmp_path / "optuna.journal").read_bytes()
    before = sorted((r.info.run_id, r.info.status) for r in runs(tmp_path, "trial") + runs(tmp_path, "sweep"))

    done = subprocess.run(command(tmp_path, "pruning=global_magnitude", "pruning.amount=0,0.5", "train.epochs=2"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("pqsweep: error:")]
    assert "train.epochs=1 (this command: 2)" in line and "study.name=" in line
    assert (tmp_path / "optuna.journal").read_bytes() == journal
    after = sorted((r.info.run_id, r.info.status) for r in runs(tmp_path, "trial") + runs(tmp_path, "sweep"))
    assert after == before


def test_the_command_line_narrows_a_sweep_files_grid_within_one_study(tmp_path):
    narrowed = ["sweep=mnist_cnn_sparsity_x_precision", *TINY, "pruning.amount=0,0.5"]
    sweep(tmp_path, *narrowed, "quantization=none")
    sweep(tmp_path, *narrowed, "quantization=fp16")
    # at tiny settings it is a variation of the file's study (mnist_cnn_sparsity_x_precision@...): both narrowings
    # land in that one
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    (name,) = optuna.get_all_study_names(storage)
    assert name.startswith("mnist_cnn_sparsity_x_precision@")
    trials = study(tmp_path, name).trials
    assert sorted((t.params["pruning.amount"], t.params["quantization"]) for t in trials) == [
        (0, "fp16"), (0, "none"), (0.5, "fp16"), (0.5, "none")]
    assert len(runs(tmp_path, "sweep")) == 1  # one study, one parent

    done = subprocess.run(command(tmp_path, *narrowed[:-1], "pruning.amount=0.3"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "pruning.amount=0.3 is not in the grid" in done.stderr


@injects('a worker on another host dies (RDB storage)',
         'its heartbeat stops; after 4 intervals the next worker fails the trial, KILLs its run and reruns the point',
         "the lost trial's partial work")
def test_a_worker_lost_on_another_host_is_found_by_its_heartbeat(tmp_path):
    # On an RDB storage each running trial beats every heartbeat_interval; a worker on another machine that died
    # stops beating, and the next worker fails its trial (its MLflow run KILLED) and runs the point again.
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = [*GRID[:2], "pruning.amount=0,0.5,0.7", "train.finetune_epochs=4", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.heartbeat_interval=1"]
    assert interrupted(tmp_path, *args, sig=signal.SIGKILL) == -signal.SIGKILL
    lost = optuna.load_study(study_name="pruning.amount", storage=storage)
    (running,) = lost.get_trials(states=(TrialState.RUNNING,))
    lost._storage.set_trial_user_attr(running._trial_id, "pqsweep.host", "another-host")  # not ours to check by PID
    time.sleep(5)  # past the grace period: 4 heartbeat intervals

    output = sweep(tmp_path, *args)
    assert "left RUNNING by a dead process" in output
    trials = optuna.load_study(study_name="pruning.amount", storage=storage).trials
    assert trials[running.number].state == TrialState.FAIL
    assert sorted(t.params["pruning.amount"] for t in trials if t.state == TrialState.COMPLETE) == [0, 0.5, 0.7]
    (killed,) = [r for r in runs(tmp_path, "trial") if r.info.status == "KILLED"]
    assert killed.info.run_id == running.user_attrs["mlflow_run_id"]
    assert killed.data.tags["interrupted"] == "its heartbeat stopped"


@injects('four runs start at once on a fresh MLflow store',
         'the store is created once, under a lock; all four runs are recorded',
         'nothing')
def test_four_runs_started_at_once_on_a_fresh_store_are_all_recorded(tmp_path):
    # MLflow migrates a fresh SQLite store unlocked; pqsweep creates it once, under a lock, before anyone writes.
    runs_at_once = [subprocess.Popen([sys.executable, "-m", "pqsweep.cli", *TINY, "train.epochs=0",
                                      f"train.seed={seed}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                      f"cache.dir={tmp_path}/cache"], cwd=tmp_path, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for seed in range(4)]
    outputs = [run.communicate(timeout=600) for run in runs_at_once]
    assert [run.returncode for run in runs_at_once] == [0, 0, 0, 0], [err[-2000:] for _, err in outputs]
    assert not [err for _, err in outputs if "alembic" in err or "duplicate column" in err]
    assert sorted(r.info.status for r in runs(tmp_path, "trial")) == ["FINISHED"] * 4


def test_a_study_begun_in_another_experiment_resumes_there_with_its_baseline(tmp_path):
    """A store of before one experiment per study kept every study in `pqsweep`: resumed, the study's new trials and
    its baseline join its parent there, so its report and the UI find one study in one experiment."""
    grid = ["pruning=global_magnitude", "pruning.amount=0,0.5,0.7", "quantization=none", "train.finetune_epochs=4"]
    assert interrupted(tmp_path, *grid, "tracking.experiment=pqsweep", sig=signal.SIGKILL) == -signal.SIGKILL
    sweep(tmp_path, *grid)  # as now: tracking.experiment is the study's name
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    home = client.get_experiment_by_name("pqsweep").experiment_id
    (parent,) = client.search_runs([home], "tags.stage = 'sweep'")
    trials = client.search_runs([home], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(t.data.params["pruning.amount"] for t in trials if t.info.status == "FINISHED") == ["0.0", "0.5", "0.7"]
    assert len(client.search_runs([home], "tags.stage = 'baseline'")) == 1
    elsewhere = [e for e in experiment_ids(client) if e != home]
    assert client.search_runs(elsewhere, "") == []  # nothing of the study landed in an experiment of its name
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "pqsweep"]  # nor was one made for it


@injects("a worker of two killed (SIGKILL) while the other still runs",
         "the living worker fails the dead one's trial at its next batch (its PID is gone on this host), KILLs its run "
         "and runs the point before it exits",
         "the killed trial's partial work")
def test_a_dead_workers_trial_is_run_again_by_the_worker_that_lives(tmp_path):
    args = [*GRID, "train.finetune_epochs=3"]
    survivor_log = (tmp_path / "survivor.log").open("w")
    survivor = subprocess.Popen(command(tmp_path, *args), cwd=tmp_path, stdout=survivor_log,
                                stderr=subprocess.STDOUT, text=True)
    time.sleep(3)  # the survivor has made the study and its store
    assert interrupted(tmp_path, *args, sig=signal.SIGKILL) == -signal.SIGKILL  # the other worker, mid-trial
    assert survivor.wait(timeout=600) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    output = (tmp_path / "survivor.log").read_text()
    assert "left RUNNING by a dead process" in output
    assert_whole(tmp_path, 6)  # every point COMPLETE once, nothing RUNNING, the parent FINISHED
    (killed,) = [r for r in runs(tmp_path, "trial") if r.info.status == "KILLED"]
    assert "is gone" in killed.data.tags["interrupted"]


@injects("the same study pointed at another MLflow store (tracking.uri changed, the same journal)",
         "refused in one line naming the store that holds the study's parent run; the other store is not created",
         "nothing: the study's runs stay in one store, its report shows them all")
def test_a_study_stays_in_the_mlflow_store_that_holds_its_parent_run(tmp_path):
    grid = ["pruning=global_magnitude", "pruning.amount=0,0.5", f"hydra.sweeper.storage={tmp_path}/optuna.journal"]
    sweep(tmp_path, *grid)
    other = tmp_path / "elsewhere"
    other.mkdir()
    done = subprocess.run([*command(tmp_path, *grid), f"tracking.uri=sqlite:///{other}/mlflow.db"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("pqsweep: error:")]
    assert f"keeps its runs in sqlite:///{tmp_path}/mlflow.db" in line and f"sqlite:///{other}/mlflow.db" in line
    assert list(other.iterdir()) == []  # no second store
    again = sweep(tmp_path, *grid)  # back in its own store: resumed, nothing to run
    assert "2 grid points, 2 done, 0 to run" in again and len(runs(tmp_path, "sweep")) == 1


# -- a variation of a sweep file: its own study, so the file's command still runs -----------------------------------

TINY_FILE = """# @package _global_
defaults:
  - override /dataset: digits
  - override /pruning: global_magnitude
  - override /hydra/sweeper/sampler: grid
study:
  name: tiny_grid
train: {epochs: 1, finetune_epochs: 1}
measure: {warmup: 1, repeats: 2, top5: false}
hydra:
  sweeper:
    params:
      pruning.amount: choice(0, 0.5)
"""


def file_sweep(tmp_path: Path, *args: str, rc: int = 0) -> str:
    """`pqsweep -m sweep=tiny_grid ...`, the tiny sweep file found on hydra.searchpath; its places (stores, cache)
    are no setting of the study, so they make no variation."""
    (tmp_path / "conf" / "sweep").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "sweep" / "tiny_grid.yaml").write_text(TINY_FILE)
    done = subprocess.run([sys.executable, "-m", "pqsweep.cli", "-m", f"hydra.searchpath=[file://{tmp_path}/conf]",
                           "sweep=tiny_grid", *args, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                           f"cache.dir={tmp_path}/cache"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == rc, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def test_a_variation_of_a_sweep_file_lands_apart_the_files_command_then_runs_and_the_variation_resumes(tmp_path):
    tried = file_sweep(tmp_path, "train.finetune_epochs=2")
    name = re.search(r"study (tiny_grid@\S+): this command holds other train.finetune_epochs than sweep=tiny_grid",
                     tried).group(1)
    assert re.fullmatch(r"tiny_grid@finetune_epochs-2\.[0-9a-f]{6}", name)
    assert f"study {name} in " in tried and "2 grid points, 0 done, 2 to run" in tried

    default = file_sweep(tmp_path)  # what a new user runs next: not refused, its own study
    assert "study tiny_grid in " in default and "2 grid points, 0 done, 2 to run" in default
    assert "tiny_grid@" not in default
    # the file's name typed by hand is taken as typed: that study holds other settings, so the command is refused
    refused = file_sweep(tmp_path, "train.finetune_epochs=2", "study.name=tiny_grid", rc=1)
    assert "pqsweep: error: study tiny_grid holds train.finetune_epochs=1 (this command: 2)" in refused

    again = file_sweep(tmp_path, "train.finetune_epochs=2")  # the same command finds its study again: a resume
    assert f"study {name} in " in again and "2 grid points, 2 done, 0 to run" in again and "Launching" not in again
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    assert sorted(optuna.get_all_study_names(storage)) == ["tiny_grid", name]

    # the experiment follows the study's name, and so do its parent run and its trials' runs
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.stage = 'sweep'")
    assert parent.data.tags["sweep"] == name and parent.info.run_name == f"sweep-{name}"
    trials = client.search_runs([experiment.experiment_id], "tags.stage = 'trial'")
    assert {r.data.params["train.finetune_epochs"] for r in trials} == {"2"} and len(trials) == 2
    (baseline,) = client.search_runs([experiment.experiment_id], "tags.stage = 'baseline'")  # logged by a trial
    assert baseline.data.tags["sweep"] == name

    typed = file_sweep(tmp_path, "train.finetune_epochs=2", "study.name=mine")  # a typed name is taken as typed
    assert "study mine in " in typed and "in a study of its own" not in typed
    assert sorted(optuna.get_all_study_names(storage)) == ["mine", "tiny_grid", name]

    # the report finds the file's study by its name and names its variations
    report = subprocess.run([sys.executable, "-m", "pqsweep.reports.report", "tiny_grid", "--no-plots",
                             "--uri", f"sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "sweep tiny_grid: 2 trials" in report.stdout
    assert f"1 other study of this sweep file, with other settings: {name}" in report.stdout
