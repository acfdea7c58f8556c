"""What a trial leaves in MLflow for its UI: its data set as inputs, the params that shape it, the model as deployed,
one experiment per study and the view the study opens with (the browser checks are in test_ui.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from nets import compose_cfg
from pqsweep import records, tracking, view
from pqsweep.cli import run_and_log
from pqsweep.pipeline import load_splits
from pqsweep.tracking import resolve_uri


def trial_run(cfg):
    mlflow.set_tracking_uri(resolve_uri(cfg.tracking.uri))
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                "tags.stage = 'trial'")
    return run


def inputs(run) -> dict[str, mlflow.entities.Dataset]:
    """The run's data set inputs by their context (train / val / test)."""
    found = {}
    for given in run.inputs.dataset_inputs:
        (context,) = [t.value for t in given.tags if t.key == "mlflow.data.context"]
        found[context] = given.dataset
    return found


def test_a_trial_logs_each_split_as_an_input_with_its_size_and_a_digest_of_what_builds_it(make_cfg):
    cfg = make_cfg("train.epochs=0")
    run_and_log(cfg)
    logged = inputs(trial_run(cfg))
    splits = load_splits(cfg)
    assert set(logged) == {"train", "val", "test"}
    for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        profile = json.loads(logged[name].profile)
        assert logged[name].name == "digits" and profile["num_rows"] == len(split)  # 1293 / 144 / 360
        assert profile["image_shape"] == [1, 8, 8] and profile["num_classes"] == 10
        assert json.loads(logged[name].schema)["mlflow_tensorspec"][0]["tensor-spec"]["shape"] == [-1, 1, 8, 8]
    assert len({d.digest for d in logged.values()}) == 3  # one data set per split: MLflow merges equal digests

    fewer = make_cfg("train.epochs=0", "dataset.num_samples=500", "study.name=fewer")
    run_and_log(fewer)
    cut = inputs(trial_run(fewer))
    assert cut["test"].digest != logged["test"].digest  # other images, another digest
    assert json.loads(cut["test"].profile)["num_rows"] == len(load_splits(fewer).test) < len(splits.test)


def test_params_are_what_shapes_the_trial_resolved_and_the_store_is_a_tag(make_cfg, tmp_path):
    cfg = make_cfg("train.epochs=0")
    run_and_log(cfg)
    run = trial_run(cfg)
    params = run.data.params
    assert not [k for k in params if k.startswith(("tracking.", "cache.", "study.", "sensitivity."))]
    assert {"model", "dataset", "pruning", "quantization", "train.epochs", "measure.repeats", "device"} <= set(params)
    assert params["train.finetune_lr"] == "0.0001"  # a tenth of Adam's lr, as resolved, never "None"
    assert run.data.tags["cache_dir"] == str(tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "static_int8"])
def test_log_model_logs_the_deployed_model_that_reproduces_the_trials_top1(make_cfg, quantization):
    cfg = make_cfg("train.epochs=1", "pruning=global_magnitude", "pruning.amount=0.5", f"quantization={quantization}",
                   "tracking.log_model=true")
    metrics = run_and_log(cfg)
    run = trial_run(cfg)
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert model.source_run_id == run.info.run_id and model.name == "compressed_model"
    # an MLflow 3 model record: the trial's metrics are the model's, and so are the params that shaped it
    logged = {k: v for k, v in metrics.items() if not k.startswith("seconds.")}  # the estimate's, never logged
    assert {m.key: m.value for m in model.metrics} == pytest.approx(logged)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]  # the run's output, both ways
    assert model.params["pruning.amount"] == "0.5" and model.params["quantization"] == quantization
    info = mlflow.models.get_model_info(model.model_uri)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]
    assert info.saved_input_example_info is not None

    # loaded by MLflow alone, it classifies the test split as the trial measured it: in its batches, on its engine
    loaded = mlflow.pyfunc.load_model(model.model_uri)
    test = load_splits(cfg).test
    images = torch.stack([test[i][0] for i in range(len(test))]).numpy()
    labels = np.array([test[i][1] for i in range(len(test))])
    torch.backends.quantized.engine = cfg.quantization.get("engine", torch.backends.quantized.engine)
    size = cfg.measure.eval_batch_size
    predicted = np.concatenate([np.asarray(loaded.predict(images[i:i + size])) for i in range(0, len(images), size)])
    first = torch.from_numpy(predicted).float().topk(1, dim=1).indices[:, 0].numpy()  # ties as measure.accuracy breaks them
    assert 100 * (first == labels).mean() == pytest.approx(metrics["top1"], abs=1e-6)


def test_without_log_model_no_model_is_logged(make_cfg):
    cfg = make_cfg("train.epochs=0")
    run_and_log(cfg)
    run = trial_run(cfg)
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list") == []


@pytest.mark.slow
def test_system_metrics_are_logged_in_the_trials_run_when_asked_and_only_then(tmp_path):
    pytest.importorskip("psutil")  # the extra `system`; without it the pre-run check refuses (test_bad_input)
    # a real `pqsweep` process each: MLflow's monitor is process-wide state (in one pytest process, after another
    # test's runs, it recorded nothing); 4 + 3 epochs last a few of its 1 s samples
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for asked in (True, False):
        done = subprocess.run([sys.executable, "-m", "pqsweep.cli", "dataset=digits", "train.epochs=4",
                               "train.finetune_epochs=3", f"tracking.system_metrics={str(asked).lower()}",
                               f"tracking.experiment=system_{asked}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                               f"cache.dir={tmp_path}/cache"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        experiment = client.get_experiment_by_name(f"system_{asked}").experiment_id
        (run,) = client.search_runs([experiment], "tags.stage = 'trial'")
        system = {k for k in run.data.metrics if k.startswith("system/")}
        assert ({"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system) if asked \
            else not system, system


def test_each_study_has_its_experiment_and_sensitivity_scans_theirs():
    assert compose_cfg().tracking.experiment == "adhoc"
    assert compose_cfg("sweep=mnist_cnn_sparsity_x_precision").tracking.experiment == "mnist_cnn_sparsity_x_precision"
    assert compose_cfg("sweep=mnist_cnn_sparsity_x_precision", "scale=paper").tracking.experiment == (
        "mnist_cnn_sparsity_x_precision_paper")
    assert compose_cfg(config_name="sensitivity").tracking.experiment == "sensitivity"


def test_the_view_a_study_opens_with_shows_its_objectives_and_swept_keys_first_and_charts_them(make_cfg):
    cfg = make_cfg("study.objectives=[size_gzip_mb,top1]")
    experiment = tracking.setup(cfg)
    view.share_view(experiment, ["size_gzip_mb", "top1"], ("quantization", "pruning.amount"))
    state = json.loads(MlflowClient().get_experiment(experiment).tags["mlflow.sharedViewState.pqsweep"])
    shown = ["metrics.`size_gzip_mb`", "metrics.`top1`", "params.`quantization`", "params.`pruning.amount`",
             "metrics.`top1_delta`", "metrics.`size_mb`", "metrics.`size_sparse_mb`", "metrics.`latency_ms_p50`",
             "tags.`pareto`", "attributes.`Dataset`", "attributes.`Models`"]
    # MLflow sorts a group's columns by name unless columnOrder says otherwise
    assert state["selectedColumns"] == state["columnOrder"] == shown
    # sorted by the first objective, its own way: the UI then lists every trial as a row, none folded under the parent
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`size_gzip_mb`", True)
    assert state["runsHiddenMode"] == "SHOW_ALL"  # the charts hold every run, not the first ten
    (chart,) = state["compareRunCharts"]
    assert (chart["type"], chart["xaxis"]["key"], chart["yaxis"]["key"]) == ("SCATTER", "size_gzip_mb", "top1")
    assert chart["metricSectionId"] == state["compareRunSections"][0]["uuid"]
    link = view.ui_link(experiment)
    assert link.endswith(f"#/experiments/{experiment}/runs?viewStateShareKey=pqsweep&workflowType=machine_learning")
    assert f"mlflow ui --backend-store-uri {resolve_uri(cfg.tracking.uri)}" in link
    assert view.ui_link(experiment, "abc").endswith(f"/#/experiments/{experiment}/runs/abc?workflowType=machine_learning")
    mlflow.set_tracking_uri("http://127.0.0.1:5999/")  # a team's server: its own address, nothing to start
    assert view.ui_link("7").startswith("http://127.0.0.1:5999/#/experiments/7/runs?viewStateShareKey=pqsweep")


def test_a_single_objective_study_charts_accuracy_against_size_sorted_best_first():
    state = view.state(["top1"])
    (chart,) = state["compareRunCharts"]
    assert (chart["xaxis"]["key"], chart["yaxis"]["key"]) == ("size_mb", "top1")
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`top1`", False)


def test_the_experiment_option_a_run_composed_is_a_param(monkeypatch):
    """Seed 003's sweeps grid over conf/experiment/: its option names the trial, though no config key holds it."""
    from hydra.core.hydra_config import HydraConfig

    assert records.chosen_experiment() == {}  # no Hydra job: nothing to say
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # put back after the test
    HydraConfig.instance().set_config(compose_cfg("experiment=paper003_alexnet_cifar10", hydra=True))
    assert records.chosen_experiment() == {"experiment": "paper003_alexnet_cifar10"}
    HydraConfig.instance().set_config(compose_cfg(hydra=True))
    assert records.chosen_experiment() == {}


def test_trials_logging_one_data_set_at_once_all_record_it(make_cfg):
    """Parallel trials log the same splits. MLflow's SQL store looks for a data set before it inserts it, so of four
    runs started at once one failed on the unique key (seen in CI); eight released together all record them."""
    import threading

    cfg = make_cfg()
    experiment = tracking.setup(cfg)
    data = {"train": 1293, "val": 144, "test": 360, "num_classes": 10, "in_channels": 1, "image_size": 8}
    client, release, errors = MlflowClient(), threading.Barrier(8), []
    runs = [client.create_run(experiment).info.run_id for _ in range(8)]

    def log(run_id: str) -> None:
        try:
            with mlflow.start_run(run_id=run_id):
                release.wait()
                records.log_inputs(cfg, data)
        except Exception as error:  # noqa: BLE001 - the test reports it
            errors.append(error)

    threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(len(client.get_run(run_id).inputs.dataset_inputs) == 3 for run_id in runs)


def test_an_experiments_description_names_no_parent_run_that_does_not_exist(make_cfg):
    # `adhoc` holds single runs, sensitivity scans and command-line grids (each a study named after its swept
    # keys): there is no run sweep-adhoc to unfold
    cfg = make_cfg()
    experiment = MlflowClient().get_experiment(tracking.setup(cfg))
    note = experiment.tags["mlflow.note.content"]
    assert experiment.name == "adhoc" and "sweep-adhoc" not in note
    assert "sweep-<that name>" in note and "pqsweep-report --list" in note
    # a sweep file's study has its experiment, which says where its table and front are
    named = compose_cfg("sweep=mnist_cnn_sparsity_x_precision")
    assert "The pqsweep study mnist_cnn_sparsity_x_precision: the link" in tracking.description(named)
    assert "pqsweep-report mnist_cnn_sparsity_x_precision" in tracking.description(named)
