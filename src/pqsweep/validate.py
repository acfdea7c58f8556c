"""The range checks of every schema, and the rules between groups: a bad value is refused in one line naming the key.

`validate(cfg)` runs each group's checks (CHECKS, by the group's schema: a family's checks add to its parent's), then
the rules between groups. It imports torch only for device=cuda or model.pretrained=true (to ask for the GPU and the
torch hub folder, in runs that load torch anyway), so the pre-run check answers at once.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from pqsweep import datafiles
from pqsweep.checks import FRACTION, Check, at_least, instantiable, refuse_first
from pqsweep.metrics import CURVED, OBJECTIVES, UNCURVED
from pqsweep.runtimes import EAGER, EXTRA, RUNTIMES, missing
from pqsweep.options import (GRADIENT_CRITERIA, RETRAINED, Backend, GroupNormConfig, DatasetConfig, Export, FakeDatasetConfig, FakeQuantConfig, Importance,
                             Int8Config, IterativeConfig, L1FilterConfig, MixedConfig, Rounding, ModelConfig, Order, PruningConfig, QATConfig, QuantizationConfig, Scope,
                             StructuredUnstructuredConfig)
from pqsweep.schema import (GROUPS, CacheConfig, LaunchConfig, MeasureConfig, SensitivityConfig, StudyConfig,
                            TrackingConfig, TrainConfig, number)

def fractions_file(path: Path) -> bool:
    """Whether `path` is YAML {layer: amount} with every amount in [0, 1), as pruning.unstructured reads it."""
    try:
        amounts = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # noqa: BLE001 - unreadable YAML is one more way of not being such a file
        return False
    return isinstance(amounts, dict) and all(number(v) and 0 <= v < 1 for v in amounts.values())


# -- each schema's checks, called on the composed node of its group ---------------------------------------------


def model(node) -> list[Check]:
    if not node.pretrained:
        return []
    if node.weights is None:
        return [Check("pretrained", "true", False, f"false: model={node.name} has no pretrained weights")]
    from torch.hub import get_dir  # torch loads only for a pretrained model, which loads it anyway

    path = Path(get_dir()) / "checkpoints" / node.weights
    return [Check("pretrained", "true", path.is_file(), f"false, or {node.weights} placed at {path} (a run "
                  "never downloads; fetch it on a machine that is online)")]


def dataset(node, synthetic: bool = False) -> list[Check]:
    resize, n, classes = node.resize, node.num_samples, node.num_classes
    checks = [Check("val_fraction", node.val_fraction, 0.0 < node.val_fraction < 1.0, "in (0, 1)"),
              Check("resize", resize, resize is None or resize >= 1, "null or an integer >= 1"),
              at_least("split_seed", node.split_seed, 0),  # scikit-learn takes no negative random_state
              Check("num_samples", n, n is None or n >= 3, "null (all) or an integer >= 3 (an image for each split)")]
    if classes and not synthetic and n is not None and n >= 3:  # a real set cut so small its test split lacks classes
        checks.append(Check("num_samples", n, n >= 5 * classes, f"null (all) or an integer >= {5 * classes} (5 "
                            f"images for each of dataset={node.name}'s {classes} classes, or its splits lack some)"))
    if node.files and node.download:
        checks.append(Check("download", "true", node.downloadable,
                            f"false: dataset={node.name} has no automatic download; put its files under root"))
    elif node.files:
        fix = "; or set dataset.download=true where you are online" if node.downloadable else ""
        problem = datafiles.problem(node.root, node.files)
        checks.append(Check("root", node.root, problem is None,
                            f"a folder holding {datafiles.listing(node.files)} ({problem}){fix}"))
    return checks


def fake_dataset(node) -> list[Check]:
    return dataset(node, synthetic=True) + [at_least("num_samples", node.num_samples, 10), at_least("image_size", node.image_size, 1),
                            at_least("channels", node.channels, 1), at_least("num_classes", node.num_classes, 2)]


def unused(node, family: str) -> list[Check]:
    """The keys an option says it ignores (its `unused` fact) keep their schema's default: a run that took another
    value would record a setting that did nothing."""
    defaults = {f.name: f.default for f in dataclasses.fields(OmegaConf.get_type(node))}
    unknown = [key for key in node.unused if key not in defaults]
    checks = [Check("unused", list(node.unused), not unknown,
                    f"keys of the {family} schema ({', '.join(unknown)} is none)")]
    for key in (k for k in node.unused if k in defaults):
        allowed = "null" if defaults[key] is None else str(defaults[key]).lower() if isinstance(defaults[key], bool) \
            else defaults[key]
        checks.append(Check(key, node[key], node[key] == defaults[key],
                            f"{allowed}: {family}={node.name} does not use it"))
    return checks


def pruning(node) -> list[Check]:
    checks = [Check("amount", node.amount, 0.0 <= node.amount < 1.0, FRACTION), *unused(node, "pruning")]
    iterative_option = issubclass(OmegaConf.get_type(node), IterativeConfig)
    rewind = option_value(node.rewind)
    checks.append(Check("rewind", rewind, rewind != "reinit" or iterative_option,
                        "finetune, weights or lr (reinit is iterative's; rewind=weights with rewind_epoch=0 resets "
                        "the survivors to their initial values and retrains them)"))
    checks.append(Check("rewind_epoch", node.rewind_epoch, node.rewind_epoch == 0 or node.rewind in RETRAINED,
                        f"0: rewind={rewind} does not use it (only weights and lr rewind to an epoch)"))
    if node.layer_amounts:
        path = Path(node.layer_amounts).expanduser()
        checks.append(Check("layer_amounts", node.layer_amounts, path.is_file(),
                            "an existing YAML file {layer: amount}"))
        # the pruner reads it only after the baseline has trained: a bad amount in it is refused here
        checks.append(Check("layer_amounts", node.layer_amounts, not path.is_file() or fractions_file(path),
                            "a YAML file mapping layer names to fractions in [0, 1)"))
        checks.append(Check("layer_amounts", node.layer_amounts, node.per_layer,
                            f"null: pruning={node.name} takes one amount for all layers, not per-layer amounts"))
    for layer, amount in node.layer_sparsity.items():
        checks.append(Check(f"layer_sparsity.{layer}", amount, number(amount) and 0 <= amount < 1, FRACTION))
    if node.layer_sparsity:
        checks.append(Check("layer_sparsity", dict(node.layer_sparsity), node.per_layer,
                            f"{{}}: pruning={node.name} takes one amount for all layers, not per-layer amounts"))
    return checks


def l1_filter(node) -> list[Check]:
    return pruning(node) + [at_least("importance_batches", node.importance_batches, 1)]


def group_norm(node) -> list[Check]:
    return pruning(node) + [Check("reg", node.reg, node.reg > 0, "a regularisation coefficient > 0"),
                            at_least("sparse_epochs", node.sparse_epochs, 0)]


def option_value(option) -> str:
    return option.value if hasattr(option, "value") else str(option)


def structured_unstructured(node) -> list[Check]:
    return l1_filter(node) + [Check(key, node[key], 0.0 <= node[key] < 1.0, FRACTION)
                            for key in ("structured", "unstructured")] + [
        Check("layer_sparsity", dict(node.layer_sparsity), not node.layer_sparsity,
              f"{{}}: pruning={node.name}'s per-layer amounts are its filter step's, given by layer_amounts")]


def iterative(node) -> list[Check]:
    epochs = node.round_epochs
    checks = pruning(node) + [
        at_least("rounds", node.rounds, 1),
        Check("round_epochs", epochs, epochs is None or epochs >= 0, "null or an integer >= 0"),
    ]
    if node.layer_amounts or node.layer_sparsity:
        given = "layer_amounts" if node.layer_amounts else "layer_sparsity"
        checks.append(Check("scope", node.scope.value, node.scope == Scope["layer"],
                            f"layer with pruning.{given} (global ranks all layers together)"))
    return checks


def quantization(node) -> list[Check]:
    names = [o.value for o in node.orders]
    return [Check("bits", node.bits, 2 <= node.bits <= 32, "an integer in 2..32"),
            Check("export_tolerance", node.export_tolerance, node.export_tolerance > 0, "> 0"),
            Check("order", node.order.value, node.order in node.orders,
                  f"{' or '.join(names)} (what quantization={node.name} supports)"), *unused(node, "quantization")]


def int8(node) -> list[Check]:
    names = [b.value for b in node.backends]
    return quantization(node) + [
        at_least("calibration_batches", node.calibration_batches, 1),
        Check("backend", node.backend.value, node.backend in node.backends,
              f"{' or '.join(names)} (what quantization={node.name} supports)"),
        Check("bias_correction", True, not node.bias_correction or node.backend == Backend.fx,
              "false with backend=pt2e: the correction is for the fx converter's weight grid"),
    ]


def qat(node) -> list[Check]:
    lr = node.qat_lr
    return int8(node) + [at_least("qat_epochs", node.qat_epochs, 0),
                         Check("qat_lr", lr, lr is None or lr > 0, "null or a learning rate > 0")]


def mixed(node) -> list[Check]:
    return int8(node) + [Check(f"layers.{layer}", precision, precision in ("fp32", "int8"), "fp32 or int8")
                         for layer, precision in node.layers.items()]


def fake_quant(node) -> list[Check]:
    # bits_w first: `bits` follows it, and the error should name the key the user typed
    return [Check(key, node[key], 2 <= node[key] <= 16, "an integer in 2..16") for key in ("bits_w", "bits_a")] \
        + quantization(node) + [at_least("calibration_batches", node.calibration_batches, 1),
                                at_least("adaround_iterations", node.adaround_iterations, 1),
                                Check("adaround_iterations", node.adaround_iterations,
                                      node.rounding == Rounding.adaround or node.adaround_iterations == 1000,
                                      "1000 (its default): rounding=nearest does not use it")] \
        + [Check(f"layer_bits.{layer}", bits, bits in LAYER_BITS, "an integer in 2..16, or 32 (the layer kept float)")
           for layer, bits in node.layer_bits.items()]


LAYER_BITS = (*range(2, 17), 32)  # fake_quant's weight bits per layer; 32 keeps a layer float


def train(node) -> list[Check]:
    lr = node.finetune_lr
    checks = [at_least("epochs", node.epochs, 0), at_least("finetune_epochs", node.finetune_epochs, 0),
              at_least("batch_size", node.batch_size, 1),
              at_least("seed", node.seed, 0),  # numpy's seed takes no negative one
              instantiable("optimizer", node.optimizer)]
    optimizer = node.optimizer if isinstance(node.optimizer, DictConfig) else {}
    if "lr" in optimizer:  # torch refuses a negative one only when the optimizer is built, after the run began
        checks.append(Check("optimizer.lr", optimizer.lr, number(optimizer.lr) and optimizer.lr > 0,
                            "a learning rate > 0"))
    if "weight_decay" in optimizer:
        decay = optimizer.weight_decay
        checks.append(Check("optimizer.weight_decay", decay, number(decay) and decay >= 0, "a number >= 0"))
    if node.scheduler is not None:
        checks.append(instantiable("scheduler", node.scheduler))
    # after optimizer.lr's: by default it follows that lr, and a bad one should be named where it was typed
    checks.append(Check("finetune_lr", lr, lr is not None and lr > 0,
                        "a learning rate > 0 (by default a tenth of train.optimizer.lr)"))
    alpha, temperature = node.distill.alpha, node.distill.temperature
    checks += [Check("distill.alpha", alpha, 0.0 <= alpha <= 1.0, "a weight in [0, 1]"),
               Check("distill.temperature", temperature, temperature > 0, "a temperature > 0"),
               Check("distill.feature", node.distill.feature, node.distill.feature >= 0, "a weight >= 0"),
               at_least("bn_batches", node.bn_batches, 0)]
    return checks


def measure(node) -> list[Check]:
    names = list(node.runtimes)
    known = bool(names) and all(name in RUNTIMES for name in names) and len(set(names)) == len(names)
    checks = [at_least("eval_batch_size", node.eval_batch_size, 1), at_least("threads", node.threads, 1),
              at_least("warmup", node.warmup, 0), at_least("repeats", node.repeats, 2),
              Check("runtimes", names, known, f"a list of distinct names among {', '.join(RUNTIMES)}"),
              Check("runtimes", names, EAGER in names, f"a list that holds {EAGER}, the runtime every other one "
                    "is compared with (e.g. [eager, onnxruntime])")]
    for name in names if known else []:  # what a runtime needs of this machine, found without importing it
        absent = missing(name)
        checks.append(Check("runtimes", names, absent is None, f"runtimes this machine can run ({name}: {absent}), "
                            f"or leave {name} out"))
    return checks


# The URI schemes MLflow builds a tracking store for (mlflow.tracking._tracking_service.utils registers them): a plain
# path or file: (file store), http(s) (a tracking server), databricks, and SQLAlchemy's databases with an optional
# +driver. Unity Catalog (databricks-uc, uc) is registered only to refuse it. Plugins add schemes as entry points.
MLFLOW_SCHEMES = ("", "file", "http", "https", "databricks")
UNITY_CATALOG = ("databricks-uc", "uc")
MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
MLFLOW_URIS = ("an MLflow tracking URI: a path, file:, sqlite:///, postgresql://, mysql://, mssql:// (each with "
               "an optional +driver), http(s)://, databricks, or a scheme an installed MLflow plugin registers")


def mlflow_store(uri: str) -> bool:
    """Whether MLflow has a tracking store for `uri` (it answers only when the run opens it)."""
    scheme = urlparse(uri).scheme
    if uri in UNITY_CATALOG or scheme in UNITY_CATALOG:  # MLflow reads the bare names as these schemes too
        return False
    if len(scheme) == 1:  # a Windows drive letter: MLflow reads C:\... as a path
        return True
    database, _, driver = scheme.partition("+")
    if scheme in MLFLOW_SCHEMES or (database in MLFLOW_DATABASES and "+" not in driver):
        return True
    from importlib.metadata import entry_points  # read only for a scheme MLflow itself does not know

    return scheme in {point.name for point in entry_points(group="mlflow.tracking_store")}


def importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def tracking(node) -> list[Check]:
    return [Check("uri", node.uri, mlflow_store(node.uri), MLFLOW_URIS),
            Check("experiment", node.experiment, bool(node.experiment.strip()), "a non-empty experiment name"),
            # MLflow only warns without psutil, and the runs would hold no system metrics
            Check("system_metrics", node.system_metrics, not node.system_metrics or importable("psutil"),
                  "false, or true where psutil is installed (pip install 'pqsweep[system]')")]


def study(node) -> list[Check]:
    ok = bool(node.objectives) and all(name in OBJECTIVES for name in node.objectives)
    return [Check("objectives", list(node.objectives), ok, f"metric names among {', '.join(OBJECTIVES)}"),
            at_least("seeds", node.seeds, 1), at_least("early_stop.min_epoch", node.early_stop.min_epoch, 1),
            at_least("early_stop.min_trials", node.early_stop.min_trials, 1),
            Check("early_stop.margin", node.early_stop.margin, node.early_stop.margin >= 0, "pp of top-1, >= 0"),
            Check("early_stop.enabled", True, not node.early_stop.enabled or (
                any(o in CURVED for o in node.objectives) and not any(o in UNCURVED for o in node.objectives)),
                "false, or objectives whose accuracy is top1 or top1_delta: a trial's curve predicts top-1, not "
                f"{' or '.join(UNCURVED)}"),
            Check("allocations", list(node.allocations), all(0 < f <= 1 for f in node.allocations),
                  "fractions in (0, 1] of the fp32 model's size_theoretical_mb")]


# Never test: the amounts a sensitivity scan chooses are a decision, and test data must not make it.
SENSITIVITY_SPLITS = ("val", "train")


def sensitivity(node) -> list[Check]:
    amounts = list(node.amounts)
    return [
        Check("amounts", amounts, bool(amounts) and all(0 <= a < 1 for a in amounts),
              "a non-empty list of fractions in [0, 1)"),
        Check("split", node.split, node.split in SENSITIVITY_SPLITS,
              f"one of {', '.join(SENSITIVITY_SPLITS)} (test would leak into the amounts chosen)"),
        Check("tolerance", node.tolerance, node.tolerance >= 0, "a top-1 drop in pp, >= 0"),
    ]


def nothing(node) -> list[Check]:
    return []


CHECKS: dict[type, Callable[[Any], list[Check]]] = {
    ModelConfig: model, DatasetConfig: dataset, FakeDatasetConfig: fake_dataset,
    PruningConfig: pruning, L1FilterConfig: l1_filter, GroupNormConfig: group_norm, StructuredUnstructuredConfig: structured_unstructured, IterativeConfig: iterative,
    QuantizationConfig: quantization, Int8Config: int8, QATConfig: qat, MixedConfig: mixed, FakeQuantConfig: fake_quant,
    TrainConfig: train, MeasureConfig: measure, TrackingConfig: tracking, CacheConfig: nothing, StudyConfig: study,
    SensitivityConfig: sensitivity, LaunchConfig: nothing,
}


def checks_of(schema: type) -> Callable[[Any], list[Check]]:
    """A family's checks, or its nearest parent's (L1FilterConfig checks as PruningConfig does)."""
    return next(CHECKS[cls] for cls in schema.__mro__ if cls in CHECKS)


def visible_cuda(device: str) -> Check:
    """device=cuda[:N] names a GPU this process sees. torch loads only here, for a run that would load it anyway."""
    import torch

    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    seen = f"cpu, or cuda:N with N < {count} (the CUDA devices visible)" if count else \
        "cpu: no CUDA device is visible (torch.cuda.device_count() is 0)"
    return Check("device", device, index < count, seen)


def recovery(cfg: DictConfig) -> list[Check]:
    """What distillation, BN re-estimation, rewinding and the pruning criteria need of the model and its training."""
    t, m, p = cfg.train, cfg.model, cfg.pruning
    checks = []
    if p.rewind in RETRAINED:
        checks.append(Check("pruning.rewind_epoch", p.rewind_epoch, 0 <= p.rewind_epoch < t.epochs,
                            f"an epoch of the baseline's training, in [0, train.epochs={t.epochs})"))
        checks.append(Check("pruning.rewind", option_value(p.rewind),
                            cfg.quantization.order == Order.prune_then_quantize,
                            "finetune with quantization.order=quantize_then_prune, which retrains nothing"))
    if t.distill.enabled:  # the teacher is the baseline: with no training and no weights it knows nothing
        checks.append(Check("train.distill.enabled", True, t.epochs > 0 or m.pretrained, "false, or a teacher that "
                            "knows something: train.epochs > 0 or model.pretrained=true (train.epochs=0 makes the "
                            "baseline, the teacher, an untrained net)"))
    if t.distill.feature > 0 and p.name != "none":
        checks.append(Check("train.distill.feature", t.distill.feature, p.zeroes_weights, f"0 with pruning={p.name}, "
                            "which removes channels: the student's features no longer align with the teacher's"))
    if t.bn_batches > 0:
        checks.append(Check("train.bn_batches", t.bn_batches, m.batchnorm,
                            f"0: model={m.name} has no BatchNorm layer to re-estimate"))
    if isinstance(OmegaConf.get_type(p), type) and issubclass(OmegaConf.get_type(p), GroupNormConfig):
        checks.append(Check("pruning", p.name, m.graph, f"a pruning option other than {p.name}: model={m.name} "
                            "cannot be traced by Torch-Pruning's dependency graph"))
    importance = cfg.pruning.get("importance")
    if importance is not None and importance != Importance.l1:
        name = option_value(importance)
        checks.append(Check("pruning.importance", name, m.graph, f"l1: model={m.name} is pruned by pqsweep's own "
                            "surgery, which Torch-Pruning's criteria cannot score (its dependency graph cannot "
                            "trace it)"))
        if importance == Importance.bn_scale:
            checks.append(Check("pruning.importance", name, m.batchnorm,
                                f"a criterion other than bn_scale: model={m.name} has no BatchNorm layer"))
        if importance in GRADIENT_CRITERIA:
            checks.append(Check("pruning.importance", name, not t.trainable, "a criterion that needs no gradients ("
                                f"not {name}): train.trainable={list(t.trainable or [])} freezes layers whose "
                                "gradients it would score by; or set train.trainable=null"))
    return checks


def runtime_goals(cfg: DictConfig) -> list[Check]:
    """An objective or constraint on a runtime's latency needs that runtime measured: else no trial has the value."""
    checks = []
    for key, goals in (("study.objectives", list(cfg.study.objectives)),
                       ("study.constraints", list(cfg.study.constraints))):
        for runtime in EXTRA:
            named = [g for g in goals if re.search(rf"\blatency_ms_p\d0_{runtime}\b", str(g))]
            if named:
                checks.append(Check(key, goals, runtime in cfg.measure.runtimes, f"metrics that are measured: "
                                    f"{named[0]} needs {runtime} in measure.runtimes (e.g. [eager,{runtime}])"))
    return checks


def validate(cfg: DictConfig) -> None:
    """Every group's own checks, then the rules between groups. Raises ConfigError before any data is loaded."""
    checks = []
    for group in GROUPS:
        found = checks_of(OmegaConf.get_type(cfg[group]))(cfg[group])
        checks += [check._replace(key=f"{group}.{check.key}") for check in found]
    p, q = cfg.pruning, cfg.quantization
    device = Check("device", cfg.device, re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) is not None, "cpu or cuda[:N]")
    if device.ok and cfg.device.startswith("cuda"):
        device = visible_cuda(cfg.device)
    checks.append(device)
    side = cfg.dataset.resize or cfg.dataset.image_size  # what the model gets; null where the data set is unknown
    if side is not None:
        low = cfg.model.min_image_size
        checks.append(Check("model", cfg.model.name, side >= low, f"a model that runs on the data set's {side} px "
                            f"images ({cfg.model.name} needs >= {low} px: set dataset.resize={low} or more)"))
    if q.order == Order.quantize_then_prune:
        checks.append(Check("pruning", p.name, p.stored_weights, "an option that prunes stored weights (its option "
                            "file says stored_weights: true) with quantization.order=quantize_then_prune"))
    if q.needs_zeros:
        checks.append(Check("pruning", p.name, p.zeroes_weights, f"an option that leaves zeros among the weights (its "
                            f"option file says zeroes_weights: true) with quantization={q.name}, which stores them"))
    checks += recovery(cfg)
    checks += runtime_goals(cfg)
    if cfg.export != Export.none:
        backend = option_value(q.get("backend", "")) if "backend" in q else ""
        formats = [e.partition("@")[0] for e in q.exports if e.partition("@")[2] in ("", backend)]
        checks.append(Check("export", cfg.export.value, cfg.export.value in formats,
                            f"{' or '.join(['none', *formats])} (what quantization={q.name}"
                            f"{f' with backend={backend}' if backend else ''} can be written as and reloaded)"))
    refuse_first(checks)
