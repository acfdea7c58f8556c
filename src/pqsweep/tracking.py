"""MLflow tracking: a trial run per task, a baseline run per baseline, a parent run per multirun (Hydra callback)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from hydra.experimental.callback import Callback
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pqsweep.stores import absolute_uri, prepare_tracking_store

log = logging.getLogger(__name__)

PARENT_ENV = "PQSWEEP_PARENT_RUN_ID"
GROUPS = ("model", "dataset", "pruning", "quantization")
# What shapes a trial, and so its params: the sweep's keys all lie in these. Where the run is stored and cached
# (tracking.*, cache.*, study.storage) and the sensitivity scan's settings say nothing of the trial: they go in tags
# or stay out.
TRIAL_GROUPS = (*GROUPS, "train", "measure", "export", "device", "scale")


resolve_uri = absolute_uri  # sqlite:///relative.db -> absolute, so every process of a sweep writes one store


EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}

# The runs table a study opens with: MLflow's own shared view (the experiment tag mlflow.sharedViewState.<key>, what
# its Share button writes), opened by ui_link. MLflow 3.17 shows only Source, Models and Dataset until columns are
# chosen by hand, and keeps that choice in the browser; a shared view holds it for everyone.
VIEW_KEY = "pqsweep"
VIEW_METRICS = ("top1", "top1_delta", "size_mb", "size_sparse_mb", "latency_ms_p50")


def connect(cfg: DictConfig) -> str:
    """Point mlflow at the configured store, creating a fresh SQLite one first; returns its URI."""
    uri = resolve_uri(cfg.tracking.uri)
    prepare_tracking_store(uri)  # a fresh SQLite store is created once, under a lock, before anyone writes to it
    mlflow.set_tracking_uri(uri)
    return uri


def setup(cfg: DictConfig) -> str:
    """Point mlflow at the configured store and experiment; returns the experiment id.

    A new experiment on a SQLite store keeps its artifacts in `mlartifacts/` beside the database file (MLflow's
    default is `./mlruns` under whatever directory the process happens to run in).
    """
    uri = connect(cfg)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            # the kind of experiment for the MLflow UIs that read it (training runs, not GenAI traces; 3.17's UI takes
            # it from a global switch instead, which ui_link's address sets)
            created = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                               tags=EXPERIMENT_TAGS | {"mlflow.note.content": description(cfg)})
            share_view(created, list(cfg.study.objectives))  # a sweep widens it with its swept keys
        except mlflow.exceptions.MlflowException:
            pass  # another process of the same sweep created it first
    return mlflow.set_experiment(cfg.tracking.experiment).experiment_id


def description(cfg: DictConfig) -> str:
    """The experiment's description, the experiments page's first words about it."""
    name = cfg.tracking.experiment
    return (f"Runs: click Model training (top left) once. The pqsweep study {name}: its trials are nested under "
            f"the run sweep-{name} (+ unfolds them); the link the sweep printed opens its columns, and "
            f"`pqsweep-report {name}` prints its table.")


def share_view(experiment_id: str, objectives: list[str] | tuple[str, ...] = (), swept: tuple[str, ...] = ()) -> None:
    """Write the study's view: the objectives and top-1, size and latency first, then the swept params, the data set
    and the logged model."""
    metrics = list(dict.fromkeys([*VIEW_METRICS[:1], *objectives, *VIEW_METRICS[1:]]))
    columns = ([f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in swept]
               + ["attributes.`Dataset`", "attributes.`Models`"])
    state = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
             "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
             "selectedColumns": columns}
    MlflowClient().set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(state))


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look in the MLflow UI: the study's runs in its view, or one run. The model-training view is asked for
    in the link: MLflow 3.17 opens every experiment in its GenAI view (its switch is global, kept by the browser,
    and no longer reads the experiment's mlflow.experimentKind tag)."""
    view = "workflowType=machine_learning"
    page = f"runs/{run_id}?{view}" if run_id else f"runs?viewStateShareKey={VIEW_KEY}&{view}"
    path = f"#/experiments/{experiment_id}/{page}"
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"run `mlflow ui --backend-store-uri {uri}` and open http://127.0.0.1:5000/{path}"


def flat_params(cfg: DictConfig, groups: tuple[str, ...] = TRIAL_GROUPS) -> dict[str, str]:
    """The resolved config of `groups` as dot keys, plus each group's chosen option under the group's own name."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    container = {k: v for k, v in container.items() if k in groups}
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)[:6000]

    walk("", container)
    for group in GROUPS:
        if group in container:
            flat[group] = str(cfg[group].name)
    return flat


def log_batch(client: MlflowClient, run_id: str, params=None, metrics=None, tags=None) -> None:
    """MLflow takes at most 100 params per batch; send them in slices."""
    params = [Param(k, v) for k, v in (params or {}).items()]
    for start in range(0, max(len(params), 1), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in (metrics or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


@contextmanager
def task_run(run_name: str, tags: dict[str, str], run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one task: the run the sweeper created for it (`run_id`), else a new one, the child of the
    sweep's parent run when there is one. An exception inside is recorded as the run's `error` tag (start_run marks
    it FAILED); Ctrl-C and SIGTERM mark it KILLED, not a failure."""
    if run_id is not None:
        client = MlflowClient()
        client.update_run(run_id, name=run_name)
        # its own experiment: a study resumed from a store of before one experiment per study keeps its first one
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        start = functools.partial(mlflow.start_run, run_id=run_id)
    else:
        start = functools.partial(mlflow.start_run, run_name=run_name, parent_run_id=os.environ.get(PARENT_ENV))
    with start(tags=tags) as active:
        try:
            yield active
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise
        except Exception as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")  # the whole traceback, beside the one-line tag
            raise


# -- runs the sweeper owns: the study's parent run, and each trial's run before its job starts ------------------


def create_parent(experiment_id: str, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    log_batch(client, run.info.run_id, params=params)
    return run.info.run_id


def run_experiment(run_id: str) -> str | None:
    """The experiment that holds a run; None when the store does not hold it."""
    try:
        return MlflowClient().get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException:
        return None


def resume_run(run_id: str) -> None:
    """Mark an existing run RUNNING again (a resumed study's parent)."""
    MlflowClient().update_run(run_id, status="RUNNING")


def create_trial_run(experiment_id: str, parent_id: str, name: str, tags: dict[str, str]) -> str:
    run = MlflowClient().create_run(experiment_id, run_name=name, tags={**tags, "mlflow.parentRunId": parent_id})
    return run.info.run_id


def close_run(run_id: str | None, status: str, reason: str | None = None, replace: tuple[str, ...] = ()) -> None:
    """End a run that is still RUNNING (its job died, was interrupted, or the sweep ends); leave an ended one, unless
    its status is in `replace` (a run FAILED by the error a library raised in place of Ctrl-C was KILLED)."""
    if not run_id:
        return
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        tag = {"FAILED": "error", "KILLED": "interrupted"}.get(status, "note")
        if run.info.status not in ("RUNNING", status, *replace):
            return  # it ended otherwise on its own: that is the truth
        if reason and tag not in run.data.tags:  # why it ended: a failure's error, or what interrupted it
            client.set_tag(run_id, tag, reason[:5000])
        if run.info.status != status:
            client.set_terminated(run_id, status)
    except mlflow.exceptions.MlflowException as error:
        log.warning("could not close MLflow run %s as %s: %s", run_id, status, error)


def run_error(run_id: str) -> str | None:
    try:
        return MlflowClient().get_run(run_id).data.tags.get("error")
    except mlflow.exceptions.MlflowException:
        return None


def finished_metrics(run_id: str | None) -> dict[str, float] | None:
    """The metrics of a run that ended FINISHED, NaN ones left out; None for any other run (or none)."""
    if not run_id:
        return None
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    if run.info.status != "FINISHED":
        return None
    return {name: float(value) for name, value in run.data.metrics.items() if not math.isnan(value)}


def finished_values(run_id: str | None, names: list[str]) -> list[float] | None:
    """The run's metrics `names` when it ended FINISHED with all of them (a trial whose process died after its run
    ended but before the sweeper heard of it); else None."""
    metrics = finished_metrics(run_id)
    if metrics is None or not all(name in metrics for name in names):
        return None
    return [metrics[name] for name in names]


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    log_batch(MlflowClient(), run_id, tags=tags)


def find_baseline_run(client: MlflowClient, experiment_id: str, key: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], f"tags.stage = 'baseline' and tags.baseline_hash = '{key}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def log_baseline(cfg: DictConfig, key: str, metrics: dict[str, float], history: list[float], config_yaml: str,
                 experiment_id: str) -> str:
    """Log the baseline once per experiment (also when it came from the cache); returns its run id.

    `history` is the mean training loss per epoch, logged as the `train_loss` series.
    """
    client = MlflowClient()
    existing = find_baseline_run(client, experiment_id, key)
    if existing:
        return existing
    run = client.create_run(
        experiment_id,
        run_name=f"baseline-{cfg.model.name}-{cfg.dataset.name}-{key[:8]}",
        tags={"stage": "baseline", "baseline_hash": key, "sweep": cfg.study.name},
    )
    params = flat_params(cfg, groups=("model", "dataset", "train", "device"))
    log_batch(client, run.info.run_id, params=params, metrics=metrics)
    client.log_batch(run.info.run_id, metrics=[Metric("train_loss", loss, 0, epoch) for epoch, loss in enumerate(history)])
    client.log_text(run.info.run_id, config_yaml, "config.yaml")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def log_trial(cfg: DictConfig, trial_number: str | None = None) -> dict[str, float]:
    """Run `cfg` through the pipeline as one MLflow trial run (params, config, exported model, metrics), log its
    baseline once per store, and return the metrics."""
    from pqsweep.cache import BaselineCache, baseline_key
    from pqsweep.pipeline import run

    if cfg.tracking.run_id is None:
        setup(cfg)
    else:  # the sweeper's run is in its study's experiment (a study begun before one experiment per study keeps
        connect(cfg)  # its first one): none of the configured name is made for it
    key = baseline_key(cfg)
    tags = {"stage": "trial", "baseline_hash": key}
    if cfg.tracking.run_id is None:  # else the sweeper created the run with its study's name and trial number
        tags["sweep"] = cfg.study.name
        if trial_number is not None:
            tags["trial_number"] = trial_number
    tags["cache_dir"] = str(Path(cfg.cache.dir).absolute())
    name = run_name(cfg)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    with task_run(name, tags, run_id=cfg.tracking.run_id) as active:
        run_id = active.info.run_id
        log_batch(MlflowClient(), run_id, params=flat_params(cfg) | chosen_experiment())
        mlflow.log_text(config_yaml, "config.yaml")
        with tempfile.TemporaryDirectory(prefix="pqsweep-export-") as exported:
            result = run(cfg, artifact_dir=exported)
            if any(Path(exported).iterdir()):
                mlflow.log_artifacts(exported, "model")
        log_inputs(cfg, result.data)
        mlflow.set_tags({"baseline_cached": str(result.baseline.cached).lower()} |
                        {f"{stage}_cached": str(hit).lower() for stage, hit in result.stages_cached.items()})
        mlflow.log_metrics(result.metrics)
        if result.model is not None:
            log_model(result.model, result.example, name)
    with BaselineCache(cfg.cache.dir).lock(key):  # parallel trials of one sweep log the baseline once
        # beside the trial: a study resumed from a store of before one experiment per study keeps its first one
        log_baseline(cfg, key, result.baseline_metrics, result.baseline.history, config_yaml,
                     active.info.experiment_id)
    m = result.metrics
    log.info(
        "run %s: top1 %.2f%% (delta %+.2f), size %.4f MB (gzip %.4f), sparsity %.3f, latency p50 %.3f ms",
        run_id, m["top1"], m["top1_delta"], m["size_mb"], m["size_gzip_mb"], m["sparsity"], m["latency_ms_p50"],
    )
    if cfg.tracking.run_id is None and PARENT_ENV not in os.environ:  # a sweep's own line says where its trials are
        log.info("in MLflow: %s", ui_link(active.info.experiment_id, run_id))
    return result.metrics


def log_model(model, example, run_name: str) -> None:
    """The compressed model as an MLflow model (mlflow.pytorch), with the signature and input example of one test
    image: what the UI's Models column shows and "Register model" takes. It is stored as TorchScript, the one format
    that holds every kind here (pqsweep.export); MLflow's default, torch.export, cannot trace torch.ao's int8
    modules, and a pickled torch.ao FX graph does not load back. mlflow.pyfunc.load_model runs it without pqsweep
    (a pt2e graph needs `import torch.ao.quantization.fx._decomposed` first)."""
    from importlib.metadata import version

    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from pqsweep.export import traced

    with torch.no_grad():
        output = model(example)
    signature = infer_signature(example.numpy(), output.float().numpy())
    # "pickle" is the format mlflow.pytorch names TorchScript with (it saves a ScriptModule by torch.jit.save); its
    # warning about unpickling arbitrary code is about pickled modules, so it is silenced here
    pickle_warning = logging.getLogger("mlflow.pytorch")
    level = pickle_warning.level
    pickle_warning.setLevel(logging.ERROR)
    try:
        mlflow.pytorch.log_model(traced(model, example), name="compressed_model", signature=signature,
                                 input_example=example.numpy(), pip_requirements=[f"torch=={version('torch')}"],
                                 serialization_format="pickle", tags={"run_name": run_name})
    finally:
        pickle_warning.setLevel(level)


def chosen_experiment() -> dict[str, str]:
    """`experiment`: the conf/experiment option the run composed (seed 003's sweeps grid over it), as a param."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choice = HydraConfig.get().runtime.choices.get("experiment")
    return {} if choice in (None, "null") else {"experiment": str(choice)}


def log_inputs(cfg: DictConfig, data: dict[str, int], attempts: int = 5) -> None:
    """Log the run's splits (split_inputs) to the active run. Parallel trials log the same data set, and MLflow's SQL
    store looks for it before it inserts it, so two at once may both insert it and one fail on the table's unique
    key (seen with four runs started at once); the transaction is rolled back, and a retry finds the other's row."""
    for attempt in range(attempts):
        try:
            mlflow.log_inputs(**split_inputs(cfg, data))
            return
        except mlflow.exceptions.MlflowException as error:
            if "unique" not in str(error).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


class SplitDataset(MetaDataset):
    """A split as an MLflow data set: its metadata (MetaDataset) with a profile, and a tensor schema."""

    def __init__(self, profile: dict, **kwargs):
        self._profile = profile
        super().__init__(**kwargs)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile),
                                    "schema": json.dumps({"mlflow_tensorspec": self.schema.to_dict()})}


def split_inputs(cfg: DictConfig, data: dict[str, int]) -> dict[str, list]:
    """The run's data set as MLflow inputs, one per split (context train / val / test): its name, a digest of what
    builds it (pqsweep.cache.data_key: the whole dataset config), its source, and the split's size and image shape as
    the profile. MLflow's Dataset column and the run page show them. Keyword arguments of mlflow.log_inputs."""
    import numpy as np
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.types import Schema, TensorSpec

    from pqsweep.cache import data_key

    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    source = CodeDatasetSource({"builder": str(node.get("_target_")), "root": str(node.get("root", ""))})
    side, channels = data["image_size"], data["in_channels"]
    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, channels, side, side), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    key, splits = data_key(cfg), ("train", "val", "test")
    profile = {"num_classes": data["num_classes"], "image_shape": [channels, side, side]}
    datasets = [SplitDataset({"num_rows": data[split], **profile}, source=source, name=str(cfg.dataset.name),
                             schema=schema, digest=hashlib.sha256(f"{key}:{split}".encode()).hexdigest()[:12])
                for split in splits]
    return {"datasets": datasets, "contexts": list(splits), "tags_list": [None] * len(splits)}


# Short forms of the options for run names, which the MLflow UI cuts at about 20 characters
PRUNING_SHORT = {"none": "", "global_magnitude": "gm", "layer_magnitude": "lm", "random": "rnd", "l1_filter": "l1f",
                 "structured_unstructured": "su", "iterative": "it"}
QUANTIZATION_SHORT = {"none": "fp32", "fp16": "fp16", "bf16": "bf16", "dynamic_int8": "dyn8", "static_int8": "int8",
                      "qat_int8": "qat8", "mixed": "mix8", "weight_only_int8": "w8", "sparse": "csr", "fake_quant": "fq"}


def run_name(cfg: DictConfig) -> str:
    """The whole method in a short form: model·pruning amount·precision (·seed when not 0), e.g. cnn·gm0.9·int8,
    resnet18_cifar·su0.5+0.3·fp16, cnn·fq4a8·s2; an option without a short form keeps its name."""
    p, q = cfg.pruning, cfg.quantization
    parts = [cfg.model.name]
    if p.name == "structured_unstructured":
        parts.append(f"su{p.structured:g}+{p.unstructured:g}")
    elif p.name != "none":
        parts.append(f"{PRUNING_SHORT.get(p.name, p.name)}{p.amount:g}")
    parts.append(f"fq{q.bits_w}a{q.bits_a}" if q.name == "fake_quant" else QUANTIZATION_SHORT.get(q.name, q.name))
    if cfg.train.seed:
        parts.append(f"s{cfg.train.seed}")
    return "·".join(parts)


class ParentRunCallback(Callback):
    """One MLflow parent run per multirun of Hydra's other sweepers (basic): trials, in this process or launcher
    workers, log under it. pqsweep's own sweeper keeps the parent with its study (pqsweep.sweeper)."""

    @staticmethod
    def ours(config: DictConfig) -> bool:
        return OmegaConf.select(config, "hydra.sweeper._target_") == "pqsweep.sweeper.OptunaSweeper"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.ours(config):
            return
        sweeper = OmegaConf.select(config, "hydra.sweeper.params") or {}
        params = {f"sweeper.{k}": str(v) for k, v in sweeper.items()}
        params["sweeper"] = OmegaConf.select(config, "hydra.runtime.choices.hydra/sweeper") or "basic"
        params["objectives"] = ",".join(config.study.objectives)
        experiment_id = setup(config)
        run_id = create_parent(experiment_id, f"sweep-{config.study.name}", params,
                               {"stage": "sweep", "sweep": config.study.name})
        os.environ[PARENT_ENV] = run_id
        log.info("MLflow parent run %s (sweep %s) at %s", run_id, config.study.name, mlflow.get_tracking_uri())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_id = os.environ.pop(PARENT_ENV, None)
        if run_id:
            # Hydra calls this from a `finally`: an exception on its way out means the sweep did not finish.
            error = sys.exc_info()[1]
            status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            MlflowClient().set_terminated(run_id, status)
