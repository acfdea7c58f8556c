"""Launchers for many machines (conf/hydra/launcher/): every option composes, and a multirun through submitit runs
its trials as submitit jobs, each recorded in MLflow."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import get_method
from mlflow.tracking import MlflowClient

from nets import compose_cfg, experiment_ids, options

# The launcher plugin each option builds on; hydra-submitit-launcher is in the test extra, Ray's is not (its own
# extra, `pqsweep[ray]`: ray is a large install CI has no use for).
PLUGIN = {"slurm": "hydra_submitit_launcher", "slurm_local": "hydra_submitit_launcher",
          "ray_cluster": "hydra_ray_launcher"}


def test_every_launcher_option_names_its_plugin():
    assert set(options("hydra/launcher")) == set(PLUGIN)


@pytest.mark.parametrize("option", options("hydra/launcher"))
def test_launcher_option_composes_and_its_launcher_resolves(option):
    if option == "ray_cluster" and importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip("hydra-ray-launcher is not installed (pip install -e '.[ray]')")
    launcher = compose_cfg(f"hydra/launcher={option}", hydra=True).hydra.launcher
    assert launcher._target_.startswith(f"hydra_plugins.{PLUGIN[option]}.")
    assert isinstance(get_method(launcher._target_), type)


@pytest.mark.slow
def test_multirun_through_submitit_runs_each_trial_as_a_job_and_records_it(tmp_path):
    command = [
        str(Path(sys.executable).parent / "pqsweep"), "-m", "dataset=digits", "train.epochs=1",
        "train.finetune_epochs=0", "measure.warmup=1", "measure.repeats=2",
        "pruning=global_magnitude", "pruning.amount=0,0.5",
        "hydra/launcher=slurm_local", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr

    # each trial ran as a submitit job (a subprocess; the job id is its pid) and returned its result through it
    results = sorted(tmp_path.glob("multirun/**/.submitit/*/*_result.pkl"))
    assert len(results) == 2 and len({r.parent.name for r in results}) == 2

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = experiment_ids(client)
    (parent,) = client.search_runs(experiments, "tags.stage = 'sweep'")
    trials = client.search_runs(experiments, "tags.stage = 'trial'")
    assert sorted((t.data.params["pruning.amount"], t.info.status) for t in trials) == [
        ("0.0", "FINISHED"), ("0.5", "FINISHED")
    ]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
