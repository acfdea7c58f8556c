"""End to end: `pqsweep -m` as a subprocess, then the sweep read back from MLflow and by `pqsweep-report`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend
from nets import experiment_ids

pytestmark = pytest.mark.slow


def pqsweep(tmp_path, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "pqsweep.cli", "-m", *args,
        "dataset=digits", "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=2", "measure.repeats=5",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == rc, done.stderr[-3000:]
    return done


def sweep_runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = experiment_ids(MlflowClient())
    client = MlflowClient()
    (parent,) = client.search_runs(experiments, "tags.stage = 'sweep'")
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    baselines = client.search_runs(experiments, "tags.stage = 'baseline'")
    return parent, children, baselines


def test_grid_multirun_logs_children_under_one_parent_and_trains_once(tmp_path):
    done = pqsweep(tmp_path, "pruning=global_magnitude", "pruning.amount=0,0.5", "quantization=none,static_int8")
    output = done.stdout + done.stderr
    assert output.count("not in cache, training") == 1
    assert output.count("(trained nothing)") == 3  # the baseline, loaded by the other three trials
    assert output.count("(pruned and fine-tuned nothing)") == 2  # each sparsity pruned once, for both precisions

    parent, children, baselines = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {(c.data.params["pruning.amount"], c.data.params["quantization"]) for c in children} == {
        ("0.0", "none"), ("0.0", "static_int8"), ("0.5", "none"), ("0.5", "static_int8")
    }
    assert sorted(c.data.tags["trial_number"] for c in children) == ["0", "1", "2", "3"]
    assert len(baselines) == 1

    report = subprocess.run(
        # a command-line grid's study is named after its swept keys
        [sys.executable, "-m", "pqsweep.reports.report", "pruning.amount+quantization", "--uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--csv", str(tmp_path / "table.csv")],
        capture_output=True, text=True, check=True,
    )
    assert "4 trials" in report.stdout
    assert len((tmp_path / "table.csv").read_text().splitlines()) == 5  # header + 4 trials


def test_optuna_grid_records_failed_trials_and_goes_on(tmp_path):
    # The sweep file's Optuna grid, narrowed on the command line and crossed with per-layer amounts; the second
    # file names a layer the CNN does not have, so its trials fail for real, inside the run. They must be recorded
    # as FAILED, the sweep must finish the others, and its exit code must say that trials failed.
    (tmp_path / "ok.yaml").write_text('"0": 0.3\n')
    (tmp_path / "bad.yaml").write_text("conv9: 0.3\n")
    pqsweep(tmp_path, "sweep=mnist_cnn_sparsity_x_precision", "pruning=layer_magnitude", "pruning.amount=0,0.9",
            f"pruning.layer_amounts={tmp_path}/ok.yaml,{tmp_path}/bad.yaml", "quantization=static_int8", rc=1)

    parent, children, _ = sweep_runs(tmp_path)
    # the file's grid at other settings (digits, 1 epoch, ...): a variation, kept apart from the file's own study
    assert parent.data.tags["sweep"].startswith("mnist_cnn_sparsity_x_precision@dataset-digits+")
    status = sorted((Path(c.data.params["pruning.layer_amounts"]).stem, c.data.params["pruning.amount"], c.info.status)
                    for c in children)
    assert status == [
        ("bad", "0.0", "FAILED"), ("bad", "0.9", "FAILED"),
        ("ok", "0.0", "FINISHED"), ("ok", "0.9", "FINISHED"),
    ]
    assert all("conv9" in c.data.tags["error"] for c in children if c.info.status == "FAILED")
    assert parent.data.tags["trials_failed"] == "2"


def test_parallel_trials_with_joblib_train_and_log_the_baseline_once(tmp_path):
    done = pqsweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "pruning=global_magnitude",
                   "pruning.amount=0,0.5,0.9")
    output = done.stdout + done.stderr
    assert output.count("not in cache, training") == 1  # the cache's file lock: the other workers waited

    _, children, baselines = sweep_runs(tmp_path)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert len(baselines) == 1


def test_the_4x4_structured_x_unstructured_grid_prunes_its_structured_step_4_times(tmp_path):
    # 002's grid at digits' size: each structured amount's filter step is one stage, shared by its 4 unstructured
    # amounts; before the step was a stage of its own, every one of the 16 points pruned and fine-tuned it again
    pqsweep(tmp_path, "pruning=structured_unstructured", "pruning.structured=0,0.25,0.5,0.75",
            "pruning.unstructured=0,0.3,0.5,0.7", "dataset.num_samples=300")
    _, children, _ = sweep_runs(tmp_path)
    assert len(children) == 16 and all(c.info.status == "FINISHED" for c in children)
    computed = [c.data.params["pruning.structured"] for c in children if c.data.tags["structured_cached"] == "false"]
    assert sorted(computed) == ["0.0", "0.25", "0.5", "0.75"]  # once per structured amount, from the stage tags
    assert {c.data.tags["prune_cached"] for c in children} == {"false"}  # each point's own unstructured step


def test_a_sweeps_console_holds_no_warning_no_bar_frames_and_its_counts_in_their_plural_forms(tmp_path):
    done = pqsweep(tmp_path, "pruning=global_magnitude", "pruning.amount=0,0.5")
    output = done.stdout + done.stderr
    # set_metric_names is experimental in Optuna: its warning is silenced where it is called, the names are kept
    assert "Warning" not in output, output[-3000:]
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    assert optuna.load_study(study_name="pruning.amount", storage=storage).metric_names == ["top1"]
    assert "\r" not in output  # no terminal here: no bar frames between the log lines
    assert "Launching 1 job locally" in output and " 1 jobs" not in output
    assert "not in cache, training 1 epoch\n" in output
    assert re.search(r"\] trial 1/2 · amount=0 · top1 [\d.]+ · \d+ s · ~\d+ s left\n", output)
