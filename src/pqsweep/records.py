"""What a run writes into MLflow beside its metrics: its params (what shapes it, from pqsweep.identity), its data
set as inputs, the baseline's own run (once per experiment), the model as deployed, and its short name."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pqsweep import identity
from pqsweep.schema import OPTION_GROUPS
from pqsweep.tracking import log_batch

log = logging.getLogger(__name__)


def params(cfg: DictConfig, stage: str = "trial") -> dict[str, str]:
    """A run's params: the resolved fields that lead to `stage` (pqsweep.identity.params) and its labels, and each
    group's chosen option by the group's own name."""
    found = identity.params(cfg, stage)
    return found | {group: str(cfg[group].name) for group in OPTION_GROUPS
                    if any(k.startswith(group + ".") for k in found)}


def find_baseline_run(client: MlflowClient, experiment_id: str, key: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], f"tags.stage = 'baseline' and tags.baseline_hash = '{key}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def log_baseline(cfg: DictConfig, key: str, metrics: dict[str, float], history: list[float], config_yaml: str,
                 experiment_id: str, tags: dict[str, str] | None = None) -> str:
    """Log the baseline once per experiment (also when it came from the cache); returns its run id.

    `history` is the mean training loss per epoch, logged as the `train_loss` series; `tags` (what ran each
    runtime's latency, pqsweep.latency) become run tags.
    """
    client = MlflowClient()
    existing = find_baseline_run(client, experiment_id, key)
    if existing:
        return existing
    run = client.create_run(
        experiment_id,
        run_name=f"baseline-{cfg.model.name}-{cfg.dataset.name}-{key[:8]}",
        tags={**(tags or {}), "stage": "baseline", "baseline_hash": key, "sweep": cfg.study.name},
    )
    log_batch(client, run.info.run_id, params=params(cfg, "baseline"), metrics=metrics)
    client.log_batch(run.info.run_id, metrics=[Metric("train_loss", loss, 0, epoch) for epoch, loss in enumerate(history)])
    client.log_text(run.info.run_id, config_yaml, "config.yaml")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def log_model(model, example, run_name: str) -> None:
    """The compressed model as an MLflow model (mlflow.pytorch), with the signature and input example of one test
    image: what the UI's Models column shows and "Register model" takes. In MLflow 3 it is a LoggedModel of the
    trial's run, which takes the run's params and the metrics the run logged at step 0 (before or after it) as its
    own, so the experiment's Models tab lists the study's models with them (test_tracking, test_ui). It is stored as TorchScript, the one format
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
    builds it (the data stage's key), its source, and the split's size and image shape as the profile. MLflow's
    Dataset column and the run page show them. Keyword arguments of mlflow.log_inputs."""
    import numpy as np
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.types import Schema, TensorSpec

    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    source = CodeDatasetSource({"builder": str(node.get("_target_")), "root": str(node.get("root", ""))})
    side, channels = data["image_size"], data["in_channels"]
    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, channels, side, side), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    key, splits = identity.stage_key(cfg, "data"), ("train", "val", "test")
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


