"""Structured-config schemas: one dataclass per config group (the method families' are in pqsweep.options), and their
registration in Hydra's ConfigStore.

Each option file in `conf/<group>/` starts from its family's schema (`defaults: [/schema/<group>/<family>@_here_]`),
so a typo or a wrong type fails at composition with Hydra's own message. Every field declares, beside its type and
comment, what it shapes (pqsweep.identity): `shapes("baseline")` and the like name the stages whose results change
with it; `fact`, `place`, `record`, `label` and `sweeper` fields shape none. Every key, a study's fixed settings
and a run's params follow from these declarations. The range checks of each schema are in pqsweep.validate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pqsweep.identity import device_kind, label, place, record, shapes, sorted_floats, sweeper
from pqsweep.options import (FINETUNED, TRAINED, DatasetConfig, Export, FakeDatasetConfig, FakeQuantConfig, GroupNormConfig,
                             Int8Config,
                             IterativeConfig, L1FilterConfig, MixedConfig, ModelConfig, PruningConfig, QATConfig,
                             QuantizationConfig, StructuredUnstructuredConfig)


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al.) from the trial's own baseline, the teacher, in every fine-tune of a
    compressed student: the structured and prune stages', iterative rounds' and QAT's. Each step's loss is
    (1 - alpha) CE(student, labels) + alpha T^2 KL(softmax(teacher / T) || softmax(student / T))."""

    enabled: bool = False
    alpha: float = 0.5  # the soft term's weight, in [0, 1]; 0 trains on the labels alone (the teacher still runs)
    temperature: float = 4.0  # T > 0 softens both distributions; T^2 keeps the soft gradients' scale
    # weight of a feature term: the mean squared difference of the classifier's inputs, student's and teacher's
    # (they align where compression kept the feature width: unstructured pruning, quantization); 0: logits only
    feature: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = shapes("baseline", default=10)  # baseline training epochs; 0 evaluates an untrained model
    finetune_epochs: int = shapes("structured", "prune", default=2)  # after pruning
    # a tenth of the optimizer's lr unless set; resolved, so the value logged and printed is the one that trains.
    # Optional: null is refused in one line. QAT takes it where quantization.qat_lr is null.
    finetune_lr: Optional[float] = shapes(*FINETUNED, default="${div:${.optimizer.lr},10}")
    batch_size: int = shapes(*TRAINED, default=64)
    seed: int = shapes(*TRAINED, default=0)  # initialisation, shuffling, random pruning, calibration batches
    optimizer: Any = shapes(*TRAINED, factory=lambda: {"_target_": "torch.optim.Adam", "lr": 1e-3,
                                                       "weight_decay": 0.0})
    # e.g. {_target_: torch.optim.lr_scheduler.CosineAnnealingLR, T_max: ${train.epochs}}
    scheduler: Any = shapes(*TRAINED, default=None)
    # Module-name prefixes whose parameters train (e.g. [layer3, layer4, fc]: 000 fine-tunes only those of an
    # ImageNet ResNet-18); the others are frozen in every training phase. null or []: all train.
    trainable: Optional[List[str]] = shapes(*TRAINED, default=None)
    # Recovery after compression (each off at its default, which is what pqsweep did before it had them):
    distill: DistillConfig = shapes(*FINETUNED, factory=DistillConfig, added=True)
    # Training batches run in train mode without gradients, BatchNorm's running statistics reset and averaged over
    # them, after each pruning step and before its fine-tune (EagleEye's adaptive BN) and before QAT; 0: none.
    bn_batches: int = shapes(*FINETUNED, default=0, added=True)


@dataclass
class MeasureConfig:
    eval_batch_size: int = shapes("baseline_metrics", "trial", default=256)
    threads: int = shapes("baseline_metrics", "trial", default=1)  # torch threads while latency is measured
    # 20 / 200: over 20 measurements of resnet18_cifar on the shared 2-core machine its p50 moved by 5.7 % (IQR /
    # median; 3-9 % in four other runs), against 14.1 % with the former 10 / 50 (3-14 %), and 10 / 100 ranged from
    # 2 to 11 % (benchmarks/speed.py stability). It costs about 12 s a measurement on resnet18_cifar, 0.1 s on the cnn.
    warmup: int = shapes("baseline_metrics", "trial", default=20)  # untimed calls before timing
    repeats: int = shapes("baseline_metrics", "trial", default=200)  # timed batch-1 calls; p50/p90 over these
    top5: bool = shapes("baseline_metrics", "trial", default=True)
    # where latency is measured, each at batch 1 with the threads, warmup and repeats above: eager (always, the
    # reference), torchscript, onnxruntime, compile (pqsweep.runtimes); each but eager logs latency_ms_p50_<runtime>
    runtimes: List[str] = shapes("baseline_metrics", "trial", factory=lambda: ["eager"], added=True)


@dataclass
class TrackingConfig:
    uri: str = place("sqlite:///mlflow.db")  # relative sqlite paths resolve against the launch directory
    # One MLflow experiment per study (as Optuna keeps one study per name): a sweep's charts and columns hold its
    # own trials, not a sensitivity scan's per-layer curves or single runs (study `adhoc`).
    experiment: str = record("${study.name}")
    # Log the compressed model as an MLflow model (signature, input example): it fills the UI's Models column and
    # can be registered. Off by default: a sweep's trials each write a copy of their model.
    log_model: bool = record(False)
    # MLflow's system metrics (CPU, memory, disk, network: `system/...`, sampled each second) in each trial's run.
    # Needs psutil (pip install 'pqsweep[system]'). They describe the machine, not the result.
    system_metrics: bool = record(False)
    timeout: float = record(5.0)  # s a tracking server has to answer the pre-run check before the command is refused


@dataclass
class CacheConfig:
    dir: str = place(".pqsweep_cache")  # cached stages, each under the hash of what shaped it


@dataclass
class EarlyStopConfig:
    """Pareto-aware early stopping of a sweep's fine-tuning trials (pqsweep.early_stop): a trial stops when a
    finished trial at least as cheap on every cost objective is more accurate than its best case, its validation
    top-1 so far plus the largest gain to the end of the `min_trials` finished curves nearest to it, plus `margin`."""

    enabled: bool = False
    min_epoch: int = 2  # the first fine-tune epoch after which a trial may stop (>= 1)
    margin: float = 1.0  # pp of top-1 added to the learned best case: higher stops fewer trials (>= 0)
    # finished curves that long before any trial is stopped, and how many of the nearest a best case learns from
    min_trials: int = 4


@dataclass
class StudyConfig:
    name: str = record("adhoc")  # the `sweep` tag of every run; sweep files set it
    # metrics the task returns, in order, among pqsweep.metrics' (their directions come from there)
    objectives: List[str] = shapes("study", factory=lambda: ["top1"])
    # Where the Optuna study is kept: an Optuna storage URL (sqlite:///, postgresql+psycopg://) or a journal file
    # (*.journal). null: optuna.journal beside the MLflow SQLite store (pqsweep.sweeper.ledger.default_storage).
    storage: Optional[str] = place(None)
    # A deployment budget, e.g. [size_gzip_mb<=0.02, top1_delta>=-1]: bounds on metrics that TPE and NSGA-II are
    # told as Optuna constraints, so they spend their trials inside it; a grid runs every point anyway. The sweeper
    # refuses a bad one in one line before it opens a store.
    constraints: List[str] = shapes("study", factory=list)
    # Run every grid point at this many seeds, train.seed, train.seed + 1, ...: each seed trains its own baseline,
    # shared by that seed's points; pqsweep-report shows each point as mean +- 95 % CI and compares options paired
    # by seed (--compare). A grid's; a search samples each point once.
    seeds: int = shapes("study", default=1, added=True)
    # Which trials a study completes, not any trial's result (a trial that is not stopped ends as it would without):
    # a study's setting, compared on resume like its objectives.
    early_stop: EarlyStopConfig = shapes("study", factory=EarlyStopConfig, added=True)
    # Size budgets, as fractions of the fp32 model's size_theoretical_mb (e.g. [0.25, 0.1]): for each, a per-layer
    # allocation chosen from each layer's measured sensitivity is enqueued as one of a new study's first trials
    # (pqsweep.allocate). For a search over per-layer fields (pqsweep.allocation); [] enqueues none.
    allocations: List[float] = shapes("study", factory=list, added=True)


@dataclass
class SensitivityConfig:
    """`pqsweep-sensitivity`: prune each layer alone with the chosen per-layer pruning option, and record accuracy."""

    amounts: List[float] = shapes("curves", key=sorted_floats,
                                  factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    split: str = shapes("curves", default="val")  # accuracy measured here (val or train; test would leak into it)
    tolerance: float = shapes("amounts", default=1.0)  # amount written = largest whose top-1 drop stays within (pp)
    output: str = place("layer_amounts.yaml")  # relative paths resolve against the launch directory


@dataclass
class LaunchConfig:
    """Set by pqsweep's sweeper for each trial it launches; null in a run started by hand."""

    trial: Optional[int] = sweeper(None)  # the Optuna trial number
    run_id: Optional[str] = sweeper(None)  # the MLflow run the sweeper created for the trial
    # with study.early_stop: the study and its storage, where the trial records its curve and reads the front
    study: Optional[str] = sweeper(None)
    storage: Optional[str] = sweeper(None)


@dataclass
class Config:
    """The root: a node per group (each field of a group declares itself), and three fields of its own."""

    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    pruning: PruningConfig = MISSING
    quantization: QuantizationConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # write the compressed model as an MLflow artifact, checked against eager outputs
    export: Export = shapes("trial", default=Export.none)
    # training device; evaluation of quantized models is always on the CPU. cuda:0 and cuda:1 train alike.
    device: str = shapes(*TRAINED, default="cpu", key=device_kind)
    # set by conf/scale/: the size a paper's sweep file runs at (SCALES); the values its ${paper_cpu:..} choose sit
    # resolved in the fields they set, so it is logged as a label and shapes nothing itself
    scale: str = label("cpu")


# A sweep file that reproduces a paper runs at either size: a value that differs is written ${paper_cpu:200,2} (the
# paper's, then cpu's), and the data set as `override /dataset: ${scale}/cifar10` (conf/dataset/paper/, cpu/).
SCALES = ("paper", "cpu")
GROUPS = ("model", "dataset", "pruning", "quantization", "train", "measure", "tracking", "cache", "study",
          "sensitivity", "launch")
OPTION_GROUPS = ("model", "dataset", "pruning", "quantization")  # a run logs each one's chosen option by name


def number(value) -> bool:
    """Untyped fields (the optimizer's) may hold a string or a list where torch wants a number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def divided(a: Any, b: Any) -> float | None:
    """The resolver ${div:a,b}, as train.finetune_lr's default uses it; None where either is no number, so that the
    check of the key the user typed (train.optimizer.lr=fast) answers, not this derived one."""
    return a / b if number(a) and number(b) and b else None


def paper_cpu(paper: Any, cpu: Any, *, _root_: DictConfig) -> Any:
    """The resolver ${paper_cpu:<paper value>,<cpu value>}: the one of the run's scale."""
    return paper if _root_.scale == "paper" else cpu


def per_layer_field(cfg: DictConfig, key: str) -> bool:
    """Whether `key` names a field its schema declares as a mapping {layer: value} (pruning.layer_sparsity,
    quantization.layer_bits): swept with one distribution, it is one param per prunable layer (pqsweep.allocation).
    A group, or a node such as train.distill, is not one."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else None
    schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
    if schema is None or not dataclasses.is_dataclass(schema):
        return False
    declared = next((f.type for f in dataclasses.fields(schema) if f.name == name), None)
    return str(declared).startswith(("Dict", "dict", "typing.Dict"))


PROBE_LAYER = "every_layer"  # the pre-run check composes a per-layer field's swept values under this one name


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent: the CLI and the tests both call it)."""
    cs = ConfigStore.instance()
    OmegaConf.register_resolver("paper_cpu", paper_cpu, replace=True)
    OmegaConf.register_resolver("div", divided, replace=True)
    for group, name, node in [
        (None, "config_schema", Config),
        ("schema/model", "model", ModelConfig),
        ("schema/dataset", "dataset", DatasetConfig),
        ("schema/dataset", "fake", FakeDatasetConfig),
        ("schema/pruning", "pruning", PruningConfig),
        ("schema/pruning", "l1_filter", L1FilterConfig),
        ("schema/pruning", "structured_unstructured", StructuredUnstructuredConfig),
        ("schema/pruning", "iterative", IterativeConfig),
        ("schema/pruning", "group_norm", GroupNormConfig),
        ("schema/quantization", "quantization", QuantizationConfig),
        ("schema/quantization", "int8", Int8Config),
        ("schema/quantization", "qat", QATConfig),
        ("schema/quantization", "mixed", MixedConfig),
        ("schema/quantization", "fake_quant", FakeQuantConfig),
        ("schema/train", "train", TrainConfig),
    ]:
        cs.store(group=group, name=name, node=node, replace=True)
