"""Bad input is refused by the pre-run check, in one line naming the key and what is allowed, before anything runs.

Each row of BAD is a command line that got past `pqsweep.preflight.check` and failed only later, after the MLflow
store, the cache or Hydra's outputs had been made (or ran when it should not have), or one of the same kind. Ranges
of single fields, each with its accepted edge, are in test_config (OUT_OF_RANGE, AT_THE_EDGE); unknown options, typos
and wrong types in test_config.BAD_INPUT. Data roots are tiny files in the real formats, written in tmp_path.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import time
import sys
from pathlib import Path

import hydra
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pqsweep.schema import register
from pqsweep.validate import validate
from pqsweep.preflight import check

from nets import compose_cfg, experiment_ids, options, write_cifar10, write_data_sets, write_idx, write_image_folder

register()  # check() composes against the schemas in Hydra's ConfigStore (pqsweep.cli registers them on import)

SWEEP = "sweep=mnist_cnn_sparsity_x_precision"

# (command line, the key its one-line refusal names). <name> stands for a folder of the `roots` fixture. The new
# single-field ranges (dataset.resize, dataset.split_seed, train.seed, train.optimizer.lr and .weight_decay) are rows
# of test_config.OUT_OF_RANGE, beside their accepted edges.
BAD = {
    # the list
    "cifar10 without its data": ("dataset=cifar10", "dataset.root"),
    "mnist at a missing root": ("dataset=mnist dataset.root=/nonexistent", "dataset.root"),
    "alexnet on 8 px digits": ("model=alexnet", "model"),
    "unknown tracking scheme": ("tracking.uri=garbage://x", "tracking.uri"),
    "evaluation batch of 0": ("measure.eval_batch_size=0", "measure.eval_batch_size"),
    "negative fine-tuning lr": ("train.finetune_lr=-1", "train.finetune_lr"),
    "cuda without a GPU": ("device=cuda", "device"),
    "optimizer outside the whitelist": ("train.optimizer._target_=os.system", "train.optimizer._target_"),
    # data roots that hold something else than the loader reads
    "mnist still gzipped": ("dataset=mnist dataset.root=<gzipped>", "dataset.root"),
    "mnist truncated": ("dataset=mnist dataset.root=<truncated>", "dataset.root"),
    "fashion_mnist holding mnist": ("dataset=fashion_mnist dataset.root=<good>/mnist", "dataset.root"),
    "cifar10 batch not a pickle": ("dataset=cifar10 dataset.root=<not_pickle>", "dataset.root"),
    "imagenet without val": ("dataset=imagenet dataset.root=<no_val>", "dataset.root"),
    "imagenet classes differ": ("dataset=imagenet dataset.root=<mismatch>", "dataset.root"),
    "imagenet downloaded": ("dataset=imagenet dataset.root=<empty> dataset.download=true", "dataset.download"),
    "grid over a set without data": ("dataset=digits,mnist dataset.root=<empty>", "dataset.root"),
    # models on images smaller than they take
    "vgg16_bn on digits": ("model=vgg16_bn", "model"),
    "alexnet on 32 px fake": ("model=alexnet dataset=fake", "model"),
    "alexnet resized too small": ("model=alexnet dataset.resize=62", "model"),
    "alexnet in a sweep's grid": (f"{SWEEP} model=cnn,alexnet", "model"),
    "pretrained cnn": ("model.pretrained=true", "model.pretrained"),
    "pretrained without weights": ("model=resnet18 model.pretrained=true", "model.pretrained"),
    # tracking
    "unity catalog as tracking": ("tracking.uri=databricks-uc", "tracking.uri"),
    "unity catalog scheme": ("tracking.uri=uc:http://localhost:8080", "tracking.uri"),
    "not a database engine": ("tracking.uri=sqlitex:///mlflow.db", "tracking.uri"),
    "two database drivers": ("tracking.uri=postgresql+a+b://u@h/db", "tracking.uri"),
    "empty experiment name": ("tracking.experiment=", "tracking.experiment"),
    # device, optimizer, targets, files
    "cuda index not a number": ("device=cuda:x", "device"),
    "lr not a number": ("train.optimizer.lr=fast", "train.optimizer.lr"),
    "scheduler outside the whitelist": ("train.scheduler={_target_:os.system}", "train.scheduler._target_"),
    "optimizer without a target": ("~train.optimizer._target_", "train.optimizer._target_"),
    "layer amount of 1.5 in its file": ("pruning=layer_magnitude pruning.layer_amounts=<amounts>",
                                        "pruning.layer_amounts"),
    # per-layer allocation (pqsweep.allocation): its values, where a run takes them and where a sweep does
    "a layer's sparsity of 1.5": ("pruning=layer_magnitude ++pruning.layer_sparsity={0:1.5}",
                                  "pruning.layer_sparsity.0"),
    "layer sparsities for a whole-model pruner": ("pruning=global_magnitude ++pruning.layer_sparsity={0:0.5}",
                                                  "pruning.layer_sparsity"),
    "layer sparsities with a global iterative ranking": ("pruning=iterative ++pruning.layer_sparsity={0:0.5}",
                                                         "pruning.scope"),
    "a layer at 17 bits": ("quantization=fake_quant ++quantization.layer_bits={0:17}", "quantization.layer_bits.0"),
    "a swept sparsity of 1.5 for every layer": ("pruning=layer_magnitude pruning.layer_sparsity=0.5,1.5",
                                                "pruning.layer_sparsity"),
    "swept bits for every layer without fake_quant": ("quantization.layer_bits=2,4", "quantization.layer_bits"),
    "an allocation budget above the fp32 size": ("study.allocations=[1.5]", "study.allocations"),
    # recovery: distillation, BN re-estimation, pruning criteria
    "distilling from an untrained baseline": ("train.distill.enabled=true train.epochs=0", "train.distill.enabled"),
    "distillation weight above 1": ("train.distill.alpha=1.5", "train.distill.alpha"),
    "distillation weight below 0": ("train.distill.alpha=-0.1", "train.distill.alpha"),
    "distillation temperature 0": ("train.distill.temperature=0", "train.distill.temperature"),
    "negative BN batches": ("train.bn_batches=-1", "train.bn_batches"),
    "BN re-estimation without BN": ("model=cnn train.bn_batches=8", "train.bn_batches"),
    "bn_scale criterion without BN": ("pruning=l1_filter pruning.importance=bn_scale", "pruning.importance"),
    "taylor on frozen layers": ("model=resnet18_cifar dataset=fake pruning=l1_filter pruning.importance=taylor "
                                "train.trainable=[fc]", "pruning.importance"),
    "hessian on frozen layers": ("model=resnet18_cifar dataset=fake pruning=structured_unstructured "
                                 "pruning.importance=hessian train.trainable=[layer4,fc]", "pruning.importance"),
    "criterion on shufflenet": ("model=shufflenet_v2 dataset=fake pruning=l1_filter pruning.importance=fpgm",
                                "pruning.importance"),
    "no batches for a gradient criterion": ("pruning=l1_filter pruning.importance=taylor pruning.importance_batches=0",
                                            "pruning.importance_batches"),
    "AdaRound where int8 conversion re-rounds": ("quantization=static_int8 quantization.rounding=adaround",
                                                 "quantization.rounding"),
    "AdaRound iterations with nearest rounding": ("quantization=fake_quant quantization.adaround_iterations=50",
                                                  "quantization.adaround_iterations"),
    "reinit after one-shot pruning": ("pruning=global_magnitude pruning.rewind=reinit", "pruning.rewind"),
    "a rewind epoch beyond the baseline's": ("pruning=global_magnitude pruning.rewind=weights pruning.rewind_epoch=10",
                                             "pruning.rewind_epoch"),
    "a rewind epoch with plain fine-tuning": ("pruning=global_magnitude pruning.rewind_epoch=2", "pruning.rewind_epoch"),
    "rewinding after quantize_then_prune": ("pruning=global_magnitude pruning.rewind=lr quantization=static_int8 "
                                            "quantization.order=quantize_then_prune", "pruning.rewind"),
    "equalization before QAT": ("quantization=qat_int8 quantization.equalize=true", "quantization.equalize"),
    "bias correction on pt2e": ("quantization=static_int8 quantization.backend=pt2e quantization.bias_correction=true",
                                "quantization.bias_correction"),
    "group-norm pruning of shufflenet": ("model=shufflenet_v2 dataset=fake pruning=group_norm", "pruning"),
    "group-norm regulariser of 0": ("pruning=group_norm pruning.reg=0", "pruning.reg"),
    "a feature term after removing channels": ("pruning=l1_filter train.distill.enabled=true train.distill.feature=1",
                                               "train.distill.feature"),
    # where latency is measured (measure.runtimes); a runtime whose package is missing: tests/test_runtimes.py
    "an unknown runtime": ("measure.runtimes=[eager,tensorrt]", "measure.runtimes"),
    "runtimes without eager": ("measure.runtimes=[onnxruntime]", "measure.runtimes"),
    "a runtime named twice": ("measure.runtimes=[eager,compile,compile]", "measure.runtimes"),
    "an objective in a runtime not measured": ("study.objectives=[top1,latency_ms_p50_onnxruntime]",
                                               "study.objectives"),
    "a constraint in a runtime not measured": ("study.constraints=['latency_ms_p90_compile<=1']", "study.constraints"),
    # Hydra's own groups
    "unknown sampler": (f"{SWEEP} hydra/sweeper/sampler=nope", "hydra/sweeper/sampler"),
    "unknown launcher": ("hydra/launcher=nope", "hydra/launcher"),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, str]:
    """Folders for the <name>s of BAD: good copies of every on-disk set, and roots broken one way each."""
    base = tmp_path_factory.mktemp("roots")
    good = write_data_sets(base / "good")
    (base / "empty").mkdir()
    write_idx(base / "gzipped" / "MNIST" / "raw")
    for path in (base / "gzipped" / "MNIST" / "raw").iterdir():  # packed as downloaded, under the unpacked names
        path.write_bytes(gzip.compress(path.read_bytes()))
    write_idx(base / "truncated" / "MNIST" / "raw")
    images = base / "truncated" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    write_cifar10(base / "not_pickle")
    (base / "not_pickle" / "cifar-10-batches-py" / "data_batch_3").write_text("label,pixels\n")
    write_image_folder(base / "no_val", per_class=(("train", 1),))
    write_image_folder(base / "mismatch", classes=("cat", "dog"), per_class=(("train", 1),))
    write_image_folder(base / "mismatch", classes=("cat", "fish"), per_class=(("val", 1),))
    (base / "amounts.yaml").write_text("'0': 0.5\n'3': 1.5\n")
    return {"good": str(good), "amounts": str(base / "amounts.yaml"),
            **{name: str(base / name) for name in ("empty", "gzipped", "truncated", "not_pickle", "no_val",
                                                   "mismatch")}}


@pytest.fixture(autouse=True)
def bare_machine(roots, monkeypatch, tmp_path):
    """No data under the option files' default roots, no weights in the torch hub cache, no GPU."""
    monkeypatch.setenv("PQSWEEP_DATA", roots["empty"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def arguments(line: str, roots: dict[str, str]) -> list[str]:
    return re.sub(r"<(\w+)>", lambda m: roots[m.group(1)], line).split()


def refusal(message: str | None, key: str) -> None:
    """One line: `<key>=<value> is not allowed: must be <allowed>`, or Hydra's `<group>=<option> is not an option`."""
    assert message is not None, "accepted"
    assert "\n" not in message
    assert re.match(rf"{re.escape(key)}=.* (is not allowed: must be |is not an option; allowed: )\S", message), \
        message


@pytest.mark.parametrize("line, key", BAD.values(), ids=BAD.keys())
def test_check_refuses_in_one_line_naming_the_key(roots, line, key):
    refusal(check(arguments(line, roots)), key)


def test_the_messages_say_what_is_allowed(roots):
    # the data set's files by name, and why this root is not it
    assert check(["dataset=mnist", "dataset.root=/nonexistent"]) == (
        "dataset.root=/nonexistent is not allowed: must be a folder holding MNIST/raw/{train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte} (/nonexistent does not exist); or "
        "set dataset.download=true where you are online")
    assert "still gzip-compressed? unpack it" in check(arguments("dataset=mnist dataset.root=<gzipped>", roots))
    assert check(["model=alexnet"]) == ("model=alexnet is not allowed: must be a model that runs on the data set's "
                                        "8 px images (alexnet needs >= 63 px: set dataset.resize=63 or more)")
    assert check(["device=cuda"]) == ("device=cuda is not allowed: must be cpu: no CUDA device is visible "
                                      "(torch.cuda.device_count() is 0)")
    trusted = "pqsweep.*, torch.optim.*, hydra_plugins.*, optuna.samplers.*, hydra._internal.*"
    assert check(["train.optimizer._target_=os.system"]).endswith(f"must be a callable in {trusted}")
    hub = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"resnet18-f37072fd.pth placed at {hub}" in check(["model=resnet18", "model.pretrained=true"])


# --- what the same checks accept ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "dataset=mnist dataset.root=<good>/mnist",
    "dataset=fashion_mnist dataset.root=<good>/fashion_mnist",
    "dataset=cifar10 dataset.root=<good>/cifar10",
    "dataset=imagenet dataset.root=<good>/imagenet model=alexnet",
    "dataset=mnist dataset.root=<empty> dataset.download=true",  # torchvision fetches what is missing
    "dataset=cifar10 dataset.root=/nonexistent dataset.download=true",
    "model=alexnet dataset.resize=63",
    "model=alexnet dataset=fake dataset.image_size=63",
    "model=vgg16_bn dataset=fake",  # 32 px, its minimum
    f"{SWEEP} hydra/sweeper/sampler=tpe",
    "hydra/launcher=joblib",
    "train.optimizer._target_=torch.optim.SGD",
    "train.scheduler={_target_:torch.optim.lr_scheduler.StepLR,step_size:1}",
    "measure.runtimes=[eager,torchscript,onnxruntime,compile]",  # onnxruntime and a C++ compiler are on this machine
    "measure.runtimes=[eager,onnxruntime] study.objectives=[top1,latency_ms_p50_onnxruntime]",
])
def test_check_accepts_good_input_of_the_same_kinds(roots, line):
    assert check(arguments(line, roots)) is None


@pytest.mark.parametrize("option", ["mnist", "fashion_mnist", "cifar10", "imagenet"])
def test_a_root_the_check_accepts_is_one_the_builder_reads(roots, monkeypatch, option):
    # the option file's facts (files, image_size) are what its builder reads and gives (the embedded sets': test_data)
    monkeypatch.setenv("PQSWEEP_DATA", roots["good"])
    cfg = compose_cfg(f"dataset={option}")
    validate(cfg)
    splits = hydra.utils.get_method(cfg.dataset._target_)(cfg.dataset)
    assert splits.image_size == cfg.dataset.image_size and len(splits.train) > 0


@pytest.mark.parametrize("count, device, expected", [
    (1, "cuda", None),
    (2, "cuda:1", None),
    (2, "cuda:2", "device=cuda:2 is not allowed: must be cpu, or cuda:N with N < 2 (the CUDA devices visible)"),
])
def test_cuda_is_accepted_where_that_gpu_is_visible(monkeypatch, count, device, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert check([f"device={device}"]) == expected


@pytest.mark.parametrize("model", [m for m in options("model") if m != "cnn"])
def test_pretrained_is_accepted_with_its_weights_in_the_hub_cache(tmp_path, model):
    from pqsweep.models import _specs

    weights = compose_cfg(f"model={model}").model.weights
    assert weights == Path(_specs()[model].weights.url).name  # the file pqsweep.models loads
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / weights).write_bytes(b"")
    assert check([f"model={model}", "model.pretrained=true", "dataset.resize=64"]) is None


def test_tracking_schemes_are_mlflows_own():
    # the scheme is the config's to check (validate); whether a server answers is the environment's (below)
    from mlflow.tracking._tracking_service import utils  # MLflow's registry of tracking-store builders

    unity = {"databricks-uc", "uc"}  # registered only to refuse them as tracking stores
    for scheme in set(utils._tracking_store_registry._registry) - unity:
        uri = f"{scheme}://host/db" if scheme else "mlruns"
        validate(compose_cfg(f"tracking.uri={uri}"))
    for uri in ["sqlite:///mlflow.db", "sqlite:////tmp/m.db", "postgresql+psycopg://u@h/db", "mysql+pymysql://h/db",
                "mssql+pyodbc://h/db", "file:///tmp/mlruns", "/tmp/mlruns", "http://127.0.0.1:5000", "databricks"]:
        validate(compose_cfg(f"tracking.uri={uri}"))


def test_system_metrics_without_psutil_are_refused_in_one_line(monkeypatch):
    # MLflow itself only warns and logs none; psutil is the extra `system` (None in sys.modules: it cannot import)
    monkeypatch.setitem(sys.modules, "psutil", None)
    message = check(["tracking.system_metrics=true"])
    assert "tracking.system_metrics" in message and "psutil" in message and len(message.splitlines()) == 1
    assert check(["tracking.system_metrics=false"]) is None


# --- the command: rc 1, one line, nothing written ---------------------------------------------------------------

CLI = {
    "cifar10 without its data": ("dataset=cifar10", "dataset.root"),
    "alexnet on 8 px digits": ("model=alexnet", "model"),
    "unknown tracking scheme": ("tracking.uri=garbage://x", "tracking.uri"),
    "cuda without a GPU": ("device=cuda", "device"),
    "optimizer outside the whitelist": ("train.optimizer._target_=os.system", "train.optimizer._target_"),
    # after an override and a flag: Hydra parses them intermixed, and so must the check
    "alexnet in a sweep's grid, after -m": (f"train.epochs=0 -m {SWEEP} model=cnn,alexnet", "model"),
    # an option's facts (issue 21's round: each of these trained, or ran a meaningless run, before it was refused)
    "an amount pruning=none ignores": ("pruning=none pruning.amount=0.5", "pruning.amount"),
    "CSR storage without zeros": ("quantization=sparse", "pruning"),
    "an export the quantization cannot carry": ("quantization=dynamic_int8 export=onnx", "export"),
    "too few images for the classes": ("dataset.num_samples=3", "dataset.num_samples"),
    # the places and services a command uses
    "a sweep that launches nothing": ("-m pruning=random pruning.amount=0,0.5 hydra.sweeper.n_jobs=0",
                                      "hydra.sweeper.n_jobs"),
    "a tracking server that does not answer": ("tracking.uri=http://127.0.0.1:1", "tracking.uri"),
    "a storage that is a path, not a URL": ("-m pruning=random pruning.amount=0,0.5 hydra.sweeper.storage=optuna.db",
                                            "hydra.sweeper.storage"),
    "a database that does not listen": (
        "-m pruning=random pruning.amount=0,0.5 study.storage=postgresql+psycopg://u@127.0.0.1:1/optuna",
        "study.storage"),
    "an output folder that cannot be made": ("hydra.run.dir=/proc/x", "hydra.run.dir"),
    "a cache folder that cannot be made": ("cache.dir=/proc/x/cache", "cache.dir"),
    "a store under a folder that cannot be made": ("tracking.uri=sqlite:////proc/x/mlflow.db", "tracking.uri"),
    "a store in a folder that does not exist": ("tracking.uri=sqlite:///nope/mlflow.db", "tracking.uri"),
    # the sweeper's own refusal, when the sweep starts: before any store or folder is made
    "a custom search space": ("-m hydra.sweeper.custom_search_space=my.extend pruning=random pruning.amount=0,0.5",
                              "hydra.sweeper.custom_search_space"),
    "a per-layer budget no allocation reaches": (
        "-m pruning=layer_magnitude quantization=fake_quant hydra/sweeper=pqsweep hydra/sweeper/sampler=tpe "
        "pruning.layer_sparsity=0.0,0.5 quantization.layer_bits=4,8 "
        "study.constraints=[\"size_theoretical_mb<=1e-05\"]",
        "study.constraints"),
}


@pytest.mark.parametrize("line, key", CLI.values(), ids=CLI.keys())
def test_the_command_refuses_before_anything_is_written(tmp_path, line, key):
    script = Path(sys.executable).parent / "pqsweep"
    work, data = tmp_path / "work", tmp_path / "data"
    for folder in (work, data):
        folder.mkdir()
    # no data where the option files look, and no GPU even on a machine that has one
    env = {**os.environ, "PQSWEEP_DATA": str(data), "CUDA_VISIBLE_DEVICES": ""}
    started = time.monotonic()
    done = subprocess.run([str(script), *line.split()], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    print(f"refused in {time.monotonic() - started:.2f} s")  # under a second here, with Python's own start
    assert done.returncode == 1, done.stderr[-3000:]
    (error,) = done.stderr.splitlines()
    assert error.startswith("pqsweep: error: ")
    refusal(error.removeprefix("pqsweep: error: "), key)
    assert done.stdout == ""
    assert list(work.iterdir()) == [] and list(data.iterdir()) == []  # no mlflow.db, .pqsweep_cache, outputs/


def test_an_error_at_run_time_is_one_line_and_its_traceback_is_in_the_log_and_the_failed_run(tmp_path):
    """A mistake only the run can see (a trainable prefix the model has no layer for) ends as one line naming the
    key, with the path of the log file that holds the traceback; the FAILED MLflow run keeps it as error.txt."""
    script = Path(sys.executable).parent / "pqsweep"
    done = subprocess.run([str(script), "train.epochs=1", "train.trainable=[nope]"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("pqsweep")]
    assert len(ours) == 1 and "Traceback" not in done.stderr and "Error executing job" not in done.stderr
    (error,) = ours
    assert error.startswith("pqsweep: error: train.trainable=['nope'] is not allowed: must be module names")
    log_file = Path(error.split("the traceback is in ", 1)[1].split(" and the MLflow run", 1)[0])
    assert log_file.is_file() and "Traceback (most recent call last)" in log_file.read_text()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = MlflowClient().search_runs(experiment_ids(MlflowClient()), "tags.stage = 'trial'")
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("ConfigError: train.trainable=")
    text = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="error.txt")).read_text()
    assert "Traceback (most recent call last)" in text and "nope names no parameter" in text


# pqsweep-report reads a store; one that is not there is refused before MLflow's client would create it empty
REPORT = {
    "a sweep in a folder without a store": ("foo", "--uri"),
    "the list of a store that is not there": ("--list", "--uri"),
    "a store named that is not there": ("foo --uri sqlite:///nope.db", "--uri"),
}


@pytest.mark.parametrize("line, key", REPORT.values(), ids=REPORT.keys())
def test_the_report_refuses_a_missing_store_and_writes_nothing(tmp_path, line, key):
    script = Path(sys.executable).parent / "pqsweep-report"
    done = subprocess.run([str(script), *line.split()], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    (error,) = done.stderr.splitlines()
    assert error.startswith("pqsweep-report: ")
    refusal(error.removeprefix("pqsweep-report: "), key)
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no reports/
