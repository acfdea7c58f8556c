"""Multi-objective search: NSGA-II and TPE over a mixed space whose keys depend on the method chosen, constrained
by a deployment budget. `pqsweep -m` runs as a subprocess; the Optuna study and the MLflow runs are read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from nets import compose_cfg, experiment_ids

TINY = ["dataset=digits", "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=1", "measure.repeats=2",
        "measure.top5=false"]
SEARCHES = ["mnist_cnn_pareto_nsgaii", "mnist_cnn_pareto_tpe"]


def command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pqsweep.cli", "-m", *TINY, *args,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache"]


def sweep(tmp_path: Path, *args: str) -> str:
    done = subprocess.run(command(tmp_path, *args), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def study(tmp_path: Path, name: str) -> optuna.Study:
    """The study of `name`; of a sweep file run with TINY's settings, its variation's (`name@...`, its own study)."""
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    (found,) = [n for n in optuna.get_all_study_names(storage) if n == name or n.startswith(name + "@")]
    return optuna.load_study(study_name=found, storage=storage)


def trial_runs(tmp_path: Path) -> dict[int, mlflow.entities.Run]:
    """The FINISHED trial runs by their Optuna trial number."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = experiment_ids(MlflowClient())
    runs = MlflowClient().search_runs(experiments, "tags.stage = 'trial'", max_results=1000)
    return {int(r.data.tags["optuna_trial_number"]): r for r in runs if r.info.status == "FINISHED"}


def test_the_two_searches_search_one_space_for_sizes_that_count_zeros():
    nsgaii, tpe = (compose_cfg(f"sweep={name}", hydra=True) for name in SEARCHES)
    assert dict(nsgaii.hydra.sweeper.params) == dict(tpe.hydra.sweeper.params)
    assert list(nsgaii.study.objectives) == list(tpe.study.objectives) == ["top1", "size_gzip_mb", "latency_ms_p50"]
    assert nsgaii.hydra.sweeper.sampler._target_.endswith("create_nsgaii_sampler")
    assert tpe.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert nsgaii.hydra.sweeper.sampler.population_size < nsgaii.hydra.sweeper.n_trials  # more than one generation
    assert nsgaii.dataset.name == "mnist5k" and nsgaii.model.name == "cnn"


@pytest.mark.slow
@pytest.mark.parametrize("bound", ['["size_gz<=0.02"]', '["top1=>90"]', '["top1_delta>=-1","size_mb<=x"]'],
                         ids=["unknown metric", "bad operator", "bad number"])
def test_a_bad_constraint_is_refused_in_one_line_before_anything_is_written(tmp_path, bound):
    done = subprocess.run(command(tmp_path, "sweep=mnist_cnn_pareto_nsgaii", f"study.constraints={bound}"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("pqsweep: error: study.constraints=")
    assert list(tmp_path.iterdir()) == []  # no MLflow store, study journal, cache or outputs


@pytest.mark.slow
def test_nsgaii_over_the_mixed_space_gives_bits_only_to_the_method_that_has_them(tmp_path):
    output = sweep(tmp_path, "sweep=mnist_cnn_pareto_nsgaii", "hydra.sweeper.n_trials=8",
                   "hydra.sweeper.sampler.population_size=4", "hydra.sweeper.sampler.seed=1")
    assert "quantization.bits_w is suggested only with quantization=fake_quant" in output
    trials = study(tmp_path, "mnist_cnn_pareto_nsgaii").trials
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    with_bits = [t for t in trials if "quantization.bits_w" in t.params]
    assert {t.params["quantization"] for t in with_bits} == {"fake_quant"}
    assert len(with_bits) == sum(t.params["quantization"] == "fake_quant" for t in trials) > 0
    assert len(with_bits) < len(trials)  # other methods ran too, without the key
    runs = trial_runs(tmp_path)
    for t in trials:  # each run was composed with the trial's values, and only those
        params = runs[t.number].data.params
        assert params["quantization"] == t.params["quantization"]
        assert params.get("quantization.bits_w") == (str(t.params["quantization.bits_w"]) if t in with_bits else None)
        assert float(params["pruning.amount"]) == pytest.approx(t.params["pruning.amount"])
        assert list(t.values) == pytest.approx([runs[t.number].data.metrics[m] for m in
                                                ("top1", "size_gzip_mb", "latency_ms_p50")])


@pytest.mark.slow
def test_a_constrained_tpe_study_records_each_trials_constraints_from_its_run(tmp_path):
    budget = '["size_gzip_mb<=0.004","top1_delta>=-20"]'
    sweep(tmp_path, "sweep=mnist_cnn_pareto_tpe", "hydra.sweeper.n_trials=5",
          "hydra.sweeper.sampler.n_startup_trials=2", f"study.constraints={budget}")
    trials = study(tmp_path, "mnist_cnn_pareto_tpe").trials
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    runs = trial_runs(tmp_path)
    for t in trials:
        metrics = runs[t.number].data.metrics
        expected = {"size_gzip_mb<=0.004": metrics["size_gzip_mb"] - 0.004,
                    "top1_delta>=-20": -20 - metrics["top1_delta"]}  # Optuna's convention: <= 0 is within
        assert t.constraints == pytest.approx(expected)  # what TPE and NSGA-II rank by
        assert t.system_attrs["constraints:size_gzip_mb<=0.004"] == pytest.approx(expected["size_gzip_mb<=0.004"])
    feasible = [all(v <= 0 for v in t.constraints.values()) for t in trials]
    stored = study(tmp_path, "mnist_cnn_pareto_tpe")
    assert set(stored.best_trials) <= {t for t, ok in zip(trials, feasible) if ok}
    # part of the study's identity: a resume under another budget is refused like any other changed setting
    assert json.loads(stored.user_attrs["pqsweep.fixed"]["study.constraints"]) == json.loads(budget)


@pytest.mark.slow
def test_a_grid_says_it_does_not_follow_constraints_and_runs_every_point(tmp_path):
    output = sweep(tmp_path, "pruning=global_magnitude", "pruning.amount=0,0.5", 'study.constraints=["top1>=99"]')
    assert "study.constraints ['top1>=99']: not followed by the grid sampler" in output
    trials = study(tmp_path, "pruning.amount").trials
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.constraints["top1>=99"] for t in trials] == pytest.approx([99 - t.values[0] for t in trials])
    assert all(t.constraints["top1>=99"] > 0 for t in trials)  # both outside the budget, both ran


@pytest.mark.slow
def test_a_key_no_option_of_its_swept_group_has_is_refused_before_anything_is_written(tmp_path):
    done = subprocess.run(command(tmp_path, "hydra/sweeper/sampler=tpe", "hydra.sweeper.n_trials=2",
                                  "quantization=choice(none,fp16)", "quantization.bits_w=int(interval(2,8))"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "pqsweep: error: quantization.bits_w: no option of quantization (none, fp16) has it" in done.stderr
    assert not (tmp_path / "optuna.journal").exists() and not (tmp_path / "mlflow.db").exists()
