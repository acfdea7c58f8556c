"""study.early_stop: a trial that a finished trial as cheap and more accurate than its best case dominates stops, one
on the front does not, and a trial that is not stopped ends exactly as it would without stopping.

The rule is tested on constructed curves; the trial's side through the real pipeline with a real Optuna journal
whose finished trials are constructed; the sweeper's side as a real `pqsweep -m` subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pqsweep import early_stop, pipeline, trial
from pqsweep.reports import report
from pqsweep.early_stop import CURVE_ATTR, TOP1_ATTR, Finished, verdict
from pqsweep.sweeper.study import open_storage

from nets import experiment_ids

MAXMIN = {"top1": "maximize", "size_gzip_mb": "minimize"}


def rule(curve, size, finished, margin=0.0, min_epoch=1, min_trials=1):
    return verdict(curve, {"size_gzip_mb": size}, 90.0, finished, MAXMIN, margin, min_epoch, min_trials)


FRONT = [Finished(0, 95.0, {"top1": 95.0, "size_gzip_mb": 0.02}, (80.0, 90.0, 94.0)),
         Finished(1, 90.0, {"top1": 90.0, "size_gzip_mb": 0.01}, (70.0, 85.0, 89.0))]


def test_a_trial_whose_best_case_a_cheaper_finished_trial_beats_stops():
    # largest gain after epoch 1 is 20 (trial 1: 70 -> 90): 60 + 20 < 95 at size 0.03 >= 0.02
    reason = rule([60.0], 0.03, FRONT)
    assert reason is not None and "trial 0" in reason and "80.00" in reason


def test_a_trial_cheaper_than_every_finished_trial_is_on_the_front_and_never_stops():
    assert rule([10.0], 0.005, FRONT) is None


def test_a_best_case_that_reaches_the_front_goes_on():
    assert rule([76.0], 0.03, FRONT, min_trials=2) is None  # 76 + 20 = 96 > 95
    assert rule([60.0], 0.03, FRONT, margin=15.0) is None  # the margin widens the best case


def test_nothing_stops_before_min_epoch_or_with_too_few_curves_that_long():
    assert rule([60.0], 0.03, FRONT, min_epoch=2) is None
    assert rule([60.0], 0.03, FRONT, min_trials=3) is None
    assert rule([60.0, 61.0, 62.0, 63.0], 0.03, FRONT) is None  # no finished curve has 4 epochs to learn from


def test_the_best_case_learns_from_the_nearest_curves_not_from_a_far_recovery():
    # trial 2 recovered 60 points from 30 %; a trial at 85 % learns from the two nearest (gains 2): 87 < 95
    front = [Finished(0, 95.0, {"top1": 95.0, "size_gzip_mb": 0.02}, (93.0,)),
             Finished(1, 94.0, {"top1": 94.0, "size_gzip_mb": 0.01}, (92.0,)),
             Finished(2, 90.0, {"top1": 90.0, "size_gzip_mb": 0.5}, (30.0,))]
    assert rule([85.0], 0.03, front, min_trials=2) is not None
    assert rule([85.0], 0.03, front, min_trials=3) is None  # with it: 85 + 60


def test_the_gain_is_learned_at_the_trials_own_epoch():
    # after epoch 2 the largest gain is 5 (trial 1: 85 -> 90): 85 + 5 < 95
    assert rule([60.0, 85.0], 0.03, FRONT) is not None
    assert rule([60.0, 91.0], 0.03, FRONT) is None


def test_a_top1_delta_objective_compares_against_the_trials_own_baseline():
    front = [Finished(0, 95.0, {"top1_delta": 5.0, "size_gzip_mb": 0.02}, (80.0,))]
    directions = {"top1_delta": "maximize", "size_gzip_mb": "minimize"}
    # best case 70 + 15 = 85, against baseline 90: -5 < 5
    assert verdict([70.0], {"size_gzip_mb": 0.03}, 90.0, front, directions, 0.0, 1, 1) is not None
    assert verdict([70.0], {"size_gzip_mb": 0.03}, 70.0, front, directions, 0.0, 1, 1) is None


# -- the trial's side: the real pipeline against a study whose finished trials are constructed ---------------------


def constructed_study(path, accuracy: float, size: float, running: bool = True, url: str | None = None):
    """A journal study with one finished trial (top1 `accuracy` at gzip size `size`, its curve 1 pp below) and, where
    `running`, one RUNNING trial for the run under test; returns (storage url, that trial's number)."""
    url = url or str(path / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(url, None), directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[accuracy, size],
                                              user_attrs={TOP1_ATTR: accuracy, CURVE_ATTR: [accuracy - 1.0] * 8}))
    return url, study.ask().number if running else None


def stoppable(make_cfg, url, number, *more):
    return make_cfg("dataset=digits", "pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_epochs=3",
                    "study.objectives=[top1,size_gzip_mb]", "study.early_stop.enabled=true",
                    "study.early_stop.min_epoch=1", "study.early_stop.min_trials=1", "study.early_stop.margin=0",
                    "launch.study=s", f"launch.storage={url}", f"launch.trial={number}", *more)


def test_a_trial_a_constructed_front_dominates_stops_after_min_epoch_and_caches_nothing(make_cfg, tmp_path):
    url, number = constructed_study(tmp_path, accuracy=100.0, size=1e-6)
    cfg = stoppable(make_cfg, url, number)
    with pytest.raises(early_stop.Stopped) as stopped:
        pipeline.run(cfg)
    assert stopped.value.epochs_run == 1 and stopped.value.epochs_saved == 2
    assert len(stopped.value.curve) == 1 and "trial 0 reached top1 100.00" in str(stopped.value)
    study = optuna.load_study(study_name="s", storage=open_storage(url, None))
    attrs = study.trials[number].user_attrs
    assert attrs[CURVE_ATTR] == stopped.value.curve and attrs[early_stop.COST_ATTR]["size_gzip_mb"] > 1e-6
    assert not list((tmp_path / "cache").glob("prune-*")), "a stopped prune stage was cached as if finished"


def test_a_trial_no_finished_trial_is_cheaper_than_goes_on_and_ends_as_without_stopping(make_cfg, tmp_path):
    # the finished trial is perfect but larger than anything pruned at 0.5: this one is on the front whatever it
    # reaches. Calibration (static_int8) and the per-epoch evaluations draw nothing the trial sees.
    url, number = constructed_study(tmp_path, accuracy=100.0, size=10.0)
    watched = pipeline.run(stoppable(make_cfg, url, number, "quantization=static_int8"))
    plain = pipeline.run(make_cfg("dataset=digits", "pruning=global_magnitude", "pruning.amount=0.5",
                                  "train.finetune_epochs=3", "quantization=static_int8",
                                  f"cache.dir={tmp_path}/other_cache"))
    for name in ("top1", "top5", "size_mb", "size_gzip_mb", "sparsity", "macs", "params_nonzero"):
        assert watched.metrics[name] == plain.metrics[name], name
    assert watched.epochs_run == 3
    study = optuna.load_study(study_name="s", storage=open_storage(url, None))
    assert len(study.trials[number].user_attrs[CURVE_ATTR]) == 3


def test_a_stopped_trials_run_is_killed_with_its_reason_curve_and_cost(make_cfg, tmp_path):
    url, number = constructed_study(tmp_path, accuracy=100.0, size=1e-6)
    returned = trial.run(stoppable(make_cfg, url, number))
    assert returned["stopped"] and returned["epochs_run"] == 1
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    (run,) = client.search_runs(experiment_ids(client), "tags.stage = 'trial'")
    assert run.info.status == "KILLED" and run.data.tags["early_stopped"] == "true"
    assert "top1" not in run.data.metrics and "size_gzip_mb" in run.data.metrics
    assert run.data.tags["finetune_epochs_run"] == "1" and run.data.tags["early_stop_epochs_saved"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1]
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "optuna.journal" in open(config).read()


# -- the sweeper's side ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_prunes_dominated_points_and_a_resume_keeps_the_decision(tmp_path, capsys):
    url, _ = constructed_study(tmp_path, accuracy=100.0, size=1e-6, running=False)
    command = [sys.executable, "-m", "pqsweep.cli", "-m", "dataset=digits", "train.epochs=1",
               "train.finetune_epochs=3", "measure.warmup=2", "measure.repeats=5", "pruning=global_magnitude",
               "pruning.amount=0.3,0.6", "study.name=s", f"hydra.sweeper.storage={url}",
               "study.objectives=[top1,size_gzip_mb]", "study.early_stop.enabled=true", "study.early_stop.min_epoch=2",
               "study.early_stop.min_trials=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
               f"cache.dir={tmp_path}/cache"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "2 stopped early" in output and "study.early_stop with the grid sampler" in output
    study = optuna.load_study(study_name="s", storage=open_storage(url, None))
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(pruned) == 2 and all(len(t.user_attrs[CURVE_ATTR]) == 2 for t in pruned)
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "Launching" not in again.stdout + again.stderr

    report.main(["s", "--uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(tmp_path / "report"), "--no-log"])
    # each stopped after epoch 2 of 3: one epoch saved each
    assert "early stopping in s: 2 of 2 trials stopped (KILLED, early_stop_reason tag), 2 of 6 fine-tune epochs " \
           "saved (33%)" in capsys.readouterr().out


@pytest.mark.slow
def test_joblib_workers_on_an_rdb_storage_stop_their_trials_from_their_own_processes(tmp_path):
    url, _ = constructed_study(tmp_path, accuracy=100.0, size=1e-6, running=False,
                               url=f"sqlite:///{tmp_path}/optuna.db")
    command = [sys.executable, "-m", "pqsweep.cli", "-m", "dataset=digits", "train.epochs=1",
               "train.finetune_epochs=2", "measure.warmup=2", "measure.repeats=5", "pruning=global_magnitude",
               "pruning.amount=0.3,0.6", "study.name=s", f"hydra.sweeper.storage={url}", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", "study.objectives=[top1,size_gzip_mb]", "study.early_stop.enabled=true",
               "study.early_stop.min_epoch=1", "study.early_stop.min_trials=1",
               f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=url)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(pruned) == 2 and all(len(t.user_attrs[CURVE_ATTR]) == 1 for t in pruned)
