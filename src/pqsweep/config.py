"""Structured-config schemas: one dataclass per config group (and per method family), registered in Hydra's ConfigStore.

Each YAML option in `conf/<group>/` starts from its family's schema (`defaults: [/schema/<group>/<family>@_here_]`),
so a typo or a wrong type fails at composition with Hydra's own message. Each schema also checks its own ranges
(`checks`), and a method's option file declares the facts other modules need about it (`stored_weights`,
`per_layer`, `backends`, `export_tolerance`; a model's `min_image_size`, a data set's `files`), so no module outside
a method names it. `validate` runs every check; it imports torch only for device=cuda or model.pretrained=true (to
ask for the GPU and the torch hub folder, in runs that load torch anyway), so the pre-run check answers at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pqsweep import datafiles


# Modules whose callables configs may name as `_target_` (Hydra 1.4 asks every instantiate for such a list).
TRUSTED_TARGETS = ["pqsweep.*", "torch.optim.*", "hydra_plugins.*", "optuna.samplers.*", "hydra._internal.*"]


def trusted(target) -> bool:
    """Whether instantiate would accept `target`: Hydra's rule, where `a.*` allows everything under `a.`."""
    return isinstance(target, str) and any(
        target.startswith(pattern[:-1]) if pattern.endswith(".*") else target == pattern
        for pattern in TRUSTED_TARGETS)


class Engine(str, Enum):
    """Quantized-kernel engines of torch.ao on CPU."""

    x86 = "x86"
    fbgemm = "fbgemm"
    qnnpack = "qnnpack"


class Backend(str, Enum):
    """How a model becomes int8: torch.ao FX graph mode, or torchao's PT2E flow on a torch.export graph."""

    fx = "fx"
    pt2e = "pt2e"


class Granularity(str, Enum):
    per_tensor = "per_tensor"
    per_channel = "per_channel"


class Order(str, Enum):
    """prune_then_quantize: prune (and fine-tune) the float model, then quantize it. quantize_then_prune: quantize
    first, then prune the stored (e.g. int8) weights by magnitude in their own domain, keeping scales and zero-points."""

    prune_then_quantize = "prune_then_quantize"
    quantize_then_prune = "quantize_then_prune"


# `global` is a Python keyword, hence the functional form; OmegaConf matches enum members by name.
Scope = Enum("Scope", {"layer": "layer", "global": "global"}, type=str)
Scope.__doc__ = "layer: the same fraction in every prunable layer. global: one ranking over all of them."


class Rewind(str, Enum):
    """After each round of iterative pruning: fine-tune the surviving weights, or re-initialise them to their
    values at initialisation and retrain (003: fine-tune large nets, re-initialise compact ones)."""

    finetune = "finetune"
    reinit = "reinit"


class Schedule(str, Enum):
    """Per-round targets of iterative pruning. geometric: each round removes the same fraction of what is left
    (Han et al.). gradual: s_t = s_f (1 - (1 - t/n)^3), Zhu & Gupta's automated gradual pruning."""

    geometric = "geometric"
    gradual = "gradual"


class Export(str, Enum):
    none = "none"
    onnx = "onnx"
    torchscript = "torchscript"


class Check(NamedTuple):
    """One range check: `key` (relative to its group) must satisfy `ok`; `allowed` says what it must be."""

    key: str
    value: Any
    ok: bool
    allowed: str


FRACTION = "a fraction in [0, 1)"


def at_least(key: str, value, low: int) -> Check:
    return Check(key, value, value >= low, f"an integer >= {low}")


def number(value) -> bool:
    """Untyped fields (the optimizer's) may hold a string or a list where torch wants a number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def instantiable(key: str, node) -> Check:
    """A node instantiate will build: a mapping whose `_target_` is among TRUSTED_TARGETS (train.py passes them)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return Check(f"{key}._target_", target, trusted(target), f"a callable in {', '.join(TRUSTED_TARGETS)}")


def fractions_file(path: Path) -> bool:
    """Whether `path` is YAML {layer: amount} with every amount in [0, 1), as pruning.unstructured reads it."""
    try:
        amounts = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # noqa: BLE001 - unreadable YAML is one more way of not being such a file
        return False
    return isinstance(amounts, dict) and all(number(v) and 0 <= v < 1 for v in amounts.values())


# Schemas check themselves: `checks(node)` is called on the composed DictConfig of the group (OmegaConf keeps the
# dataclass as the node's type), so a subclass adds its own checks to its parent's.


@dataclass
class ModelConfig:
    _target_: str = MISSING  # factory: (num_classes, in_channels, pretrained) -> nn.Module
    name: str = MISSING  # the option's name, logged as the `model` param
    pretrained: bool = False  # torchvision ImageNet weights, from the local torch cache only
    # Facts the option file declares about its architecture:
    min_image_size: int = 1  # smallest input side it runs on; validate compares the data set's image size
    weights: Optional[str] = None  # the checkpoint pretrained=true loads from <torch hub>/checkpoints; null: none

    def checks(self) -> list[Check]:
        if not self.pretrained:
            return []
        if self.weights is None:
            return [Check("pretrained", "true", False, f"false: model={self.name} has no pretrained weights")]
        from torch.hub import get_dir  # torch loads only for a pretrained model, which loads it anyway

        path = Path(get_dir()) / "checkpoints" / self.weights
        return [Check("pretrained", "true", path.is_file(), f"false, or {self.weights} placed at {path} (a run "
                      "never downloads; fetch it on a machine that is online)")]


@dataclass
class DatasetConfig:
    _target_: str = MISSING  # builder: (**these fields) -> pqsweep.data.DataSplits
    name: str = MISSING
    root: Optional[str] = None  # on-disk location for torchvision / ImageFolder sets
    download: bool = False  # let torchvision download (only where a user is online)
    resize: Optional[int] = None  # square resize of every image, e.g. 224 for ImageNet-pretrained nets
    val_fraction: float = 0.1  # share of the training data held out for validation (deterministic)
    split_seed: int = 0  # seed of the deterministic split, independent of the training seed
    # Images used in all, train + val + test, each split keeping its share (its first images): a quick run on a real
    # set, or a paper sweep's cpu scale. null: all. The fake set generates this many.
    num_samples: Optional[int] = None
    # Facts the option file declares about its data:
    image_size: Optional[int] = None  # side of the square images the model gets without resize; null: unknown
    files: Dict[str, str] = field(default_factory=dict)  # what the builder reads under root -> its format
    # (pqsweep.datafiles.FORMATS); checked before anything runs unless download=true will fetch them
    downloadable: bool = True  # download=true can fetch `files` (torchvision's sets); false: they must be there

    def checks(self) -> list[Check]:
        resize = self.resize
        checks = [Check("val_fraction", self.val_fraction, 0.0 < self.val_fraction < 1.0, "in (0, 1)"),
                  Check("resize", resize, resize is None or resize >= 1, "null or an integer >= 1"),
                  at_least("split_seed", self.split_seed, 0),  # scikit-learn takes no negative random_state
                  Check("num_samples", self.num_samples, self.num_samples is None or self.num_samples >= 3,
                        "null (all) or an integer >= 3 (an image for each split)")]
        if self.files and self.download:
            checks.append(Check("download", "true", self.downloadable,
                                f"false: dataset={self.name} has no automatic download; put its files under root"))
        elif self.files:
            fix = "; or set dataset.download=true where you are online" if self.downloadable else ""
            problem = datafiles.problem(self.root, self.files)
            checks.append(Check("root", self.root, problem is None,
                                f"a folder holding {datafiles.listing(self.files)} ({problem}){fix}"))
        return checks


@dataclass
class FakeDatasetConfig(DatasetConfig):
    num_samples: int = 512
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10

    def checks(self) -> list[Check]:
        return DatasetConfig.checks(self) + [at_least("num_samples", self.num_samples, 10),
                                             at_least("image_size", self.image_size, 1),
                                             at_least("channels", self.channels, 1),
                                             at_least("num_classes", self.num_classes, 2)]


@dataclass
class PruningConfig:
    _target_: str = MISSING  # pruner: (model, cfg, ctx: pqsweep.train.Context) -> the pruned model, masks folded
    name: str = MISSING
    amount: float = 0.0  # fraction of prunable weights (or of filters, for structured options) removed, in [0, 1)
    layer_amounts: Optional[str] = None  # YAML {layer: amount} (pqsweep-sensitivity writes one); overrides amount
    # Facts the method declares about itself in its option file:
    stored_weights: bool = False  # prunes weights as stored (fp16, int8): allowed with order=quantize_then_prune
    per_layer: bool = False  # takes per-layer amounts (layer_amounts); pqsweep-sensitivity scans such methods

    def checks(self) -> list[Check]:
        checks = [Check("amount", self.amount, 0.0 <= self.amount < 1.0, FRACTION)]
        if self.layer_amounts:
            path = Path(self.layer_amounts).expanduser()
            checks.append(Check("layer_amounts", self.layer_amounts, path.is_file(),
                                "an existing YAML file {layer: amount}"))
            # the pruner reads it only after the baseline has trained: a bad amount in it is refused here
            checks.append(Check("layer_amounts", self.layer_amounts, not path.is_file() or fractions_file(path),
                                "a YAML file mapping layer names to fractions in [0, 1)"))
            checks.append(Check("layer_amounts", self.layer_amounts, self.per_layer,
                                f"null: pruning={self.name} takes one amount for all layers, not per-layer amounts"))
        return checks


@dataclass
class L1FilterConfig(PruningConfig):
    scope: Scope = Scope["layer"]  # per-layer ratio (Li et al.), or one global ranking of filters
    # true: channels a residual add ties to several convs stay whole, each block's inner ones are pruned (002)
    keep_tied: bool = False


@dataclass
class StructuredUnstructuredConfig(L1FilterConfig):
    structured: float = 0.5  # fraction of filters removed first (l1_filter), then fine-tuned
    unstructured: float = 0.5  # then this fraction of the remaining weights (global magnitude), then fine-tuned

    def checks(self) -> list[Check]:
        return PruningConfig.checks(self) + [Check(key, self[key], 0.0 <= self[key] < 1.0, FRACTION)
                                             for key in ("structured", "unstructured")]


@dataclass
class IterativeConfig(PruningConfig):
    rounds: int = 3  # prune -> fine-tune rounds to reach `amount`
    round_epochs: Optional[int] = None  # fine-tuning epochs between rounds (default train.finetune_epochs); reinit
    # retrains from initial values, so it usually wants about train.epochs
    rewind: Rewind = Rewind.finetune
    schedule: Schedule = Schedule.geometric
    scope: Scope = Scope["global"]

    def checks(self) -> list[Check]:
        epochs = self.round_epochs
        checks = PruningConfig.checks(self) + [
            at_least("rounds", self.rounds, 1),
            Check("round_epochs", epochs, epochs is None or epochs >= 0, "null or an integer >= 0"),
        ]
        if self.layer_amounts:
            checks.append(Check("scope", self.scope.value, self.scope == Scope["layer"],
                                "layer with pruning.layer_amounts (global ranks all layers together)"))
        return checks


@dataclass
class QuantizationConfig:
    _target_: str = MISSING  # quantizer: (model, cfg, ctx: pqsweep.train.Context) -> deployable nn.Module
    name: str = MISSING
    bits: int = 32  # storage precision of the weights, reported as the `precision` column
    order: Order = Order.prune_then_quantize
    # Facts the method declares about itself in its option file:
    export_tolerance: float = 1e-4  # an exported file's logits may differ from eager by this share of the logit scale
    orders: List[Order] = field(default_factory=lambda: list(Order))  # the orders it can be composed in

    def checks(self) -> list[Check]:
        names = [o.value for o in self.orders]
        return [Check("bits", self.bits, 2 <= self.bits <= 32, "an integer in 2..32"),
                Check("export_tolerance", self.export_tolerance, self.export_tolerance > 0, "> 0"),
                Check("order", self.order.value, self.order in self.orders,
                      f"{' or '.join(names)} (what quantization={self.name} supports)")]


@dataclass
class Int8Config(QuantizationConfig):
    bits: int = 8
    engine: Engine = Engine.x86  # torch.ao quantized engine (fx backend)
    backend: Backend = Backend.fx  # torch.ao FX, or torchao PT2E (x86 Inductor quantizer), among `backends`
    granularity: Granularity = Granularity.per_channel  # weight observers; activations are always per tensor
    calibration_batches: int = 8  # training batches run through the observers (static options)
    backends: List[Backend] = field(default_factory=lambda: [Backend.fx])  # fact: the backends the method has

    def checks(self) -> list[Check]:
        names = [b.value for b in self.backends]
        return QuantizationConfig.checks(self) + [
            at_least("calibration_batches", self.calibration_batches, 1),
            Check("backend", self.backend.value, self.backend in self.backends,
                  f"{' or '.join(names)} (what quantization={self.name} supports)"),
        ]


@dataclass
class QATConfig(Int8Config):
    qat_epochs: int = 2  # quantization-aware fine-tuning epochs with fake-quant modules, then int8 conversion
    qat_lr: Optional[float] = None  # defaults to the fine-tuning learning rate

    def checks(self) -> list[Check]:
        lr = self.qat_lr
        return Int8Config.checks(self) + [at_least("qat_epochs", self.qat_epochs, 0),
                                          Check("qat_lr", lr, lr is None or lr > 0, "null or a learning rate > 0")]


@dataclass
class MixedConfig(Int8Config):
    # layer name -> fp32 | int8; `head` names the model's last Linear layer. Layers not named are int8.
    layers: Dict[Any, str] = field(default_factory=dict)  # Any: nn.Sequential layers are named 0, 1, ...; Hydra parses those as ints

    def checks(self) -> list[Check]:
        return Int8Config.checks(self) + [Check(f"layers.{layer}", precision, precision in ("fp32", "int8"),
                                                "fp32 or int8") for layer, precision in self.layers.items()]


@dataclass
class FakeQuantConfig(QuantizationConfig):
    bits: int = 8  # reported precision; set to bits_w by the option file
    bits_w: int = 8  # weight bits, 2..16
    bits_a: int = 8  # activation bits, 2..16
    symmetric: bool = True  # symmetric (zero-point 0) or asymmetric (affine) ranges
    granularity: Granularity = Granularity.per_channel  # weights; activations are per tensor
    calibration_batches: int = 8  # batches that set the activation ranges

    def checks(self) -> list[Check]:
        # bits_w first: `bits` follows it, and the error should name the key the user typed
        return [Check(key, self[key], 2 <= self[key] <= 16, "an integer in 2..16") for key in ("bits_w", "bits_a")] \
            + QuantizationConfig.checks(self) + [at_least("calibration_batches", self.calibration_batches, 1)]


@dataclass
class TrainConfig:
    epochs: int = 10  # baseline training epochs; 0 evaluates an untrained model (smoke runs)
    finetune_epochs: int = 2  # after pruning; does not change the cached baseline
    # a tenth of the optimizer's lr unless set; resolved, so the value logged and printed is the one that trains
    finetune_lr: Optional[float] = "${div:${.optimizer.lr},10}"  # Optional: null is refused in one line
    batch_size: int = 64
    seed: int = 0
    optimizer: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "lr": 1e-3, "weight_decay": 0.0}
    )
    scheduler: Any = None  # e.g. {_target_: torch.optim.lr_scheduler.CosineAnnealingLR, T_max: ${train.epochs}}
    # Module-name prefixes whose parameters train (e.g. [layer3, layer4, fc]: 000 fine-tunes only those of an
    # ImageNet ResNet-18); the others are frozen in every training phase. null or []: all train.
    trainable: Optional[List[str]] = None

    def checks(self) -> list[Check]:
        lr = self.finetune_lr
        checks = [at_least("epochs", self.epochs, 0), at_least("finetune_epochs", self.finetune_epochs, 0),
                  at_least("batch_size", self.batch_size, 1),
                  at_least("seed", self.seed, 0),  # numpy's seed takes no negative one
                  instantiable("optimizer", self.optimizer)]
        optimizer = self.optimizer if isinstance(self.optimizer, DictConfig) else {}
        if "lr" in optimizer:  # torch refuses a negative one only when the optimizer is built, after the run began
            checks.append(Check("optimizer.lr", optimizer.lr, number(optimizer.lr) and optimizer.lr > 0,
                                "a learning rate > 0"))
        if "weight_decay" in optimizer:
            decay = optimizer.weight_decay
            checks.append(Check("optimizer.weight_decay", decay, number(decay) and decay >= 0, "a number >= 0"))
        if self.scheduler is not None:
            checks.append(instantiable("scheduler", self.scheduler))
        # after optimizer.lr's: by default it follows that lr, and a bad one should be named where it was typed
        checks.append(Check("finetune_lr", lr, lr is not None and lr > 0,
                            "a learning rate > 0 (by default a tenth of train.optimizer.lr)"))
        return checks


@dataclass
class MeasureConfig:
    eval_batch_size: int = 256
    threads: int = 1  # torch threads during the latency measurement, logged as a param
    # 20 / 200: over 20 measurements of resnet18_cifar on the shared 2-core machine its p50 moved by 5.7 % (IQR /
    # median; 3-9 % in four other runs), against 14.1 % with the former 10 / 50 (3-14 %), and 10 / 100 ranged from
    # 2 to 11 % (benchmarks/speed.py stability). It costs about 12 s a measurement on resnet18_cifar, 0.1 s on the cnn.
    warmup: int = 20  # untimed calls before timing
    repeats: int = 200  # timed batch-1 calls; p50/p90 over these
    top5: bool = True

    def checks(self) -> list[Check]:
        return [at_least("eval_batch_size", self.eval_batch_size, 1), at_least("threads", self.threads, 1),
                at_least("warmup", self.warmup, 0), at_least("repeats", self.repeats, 2)]


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


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # relative sqlite paths resolve against the launch directory
    # One MLflow experiment per study (as Optuna keeps one study per name): a sweep's charts and columns hold its
    # own trials, not a sensitivity scan's per-layer curves or single runs (study `adhoc`).
    experiment: str = "${study.name}"
    run_id: Optional[str] = None  # set by the sweeper: the MLflow run it created for this trial
    # Log the compressed model as an MLflow model (signature, input example): it fills the UI's Models column and
    # can be registered. Off by default: a sweep's trials each write a copy of their model.
    log_model: bool = False

    def checks(self) -> list[Check]:
        return [Check("uri", self.uri, mlflow_store(self.uri), MLFLOW_URIS),
                Check("experiment", self.experiment, bool(self.experiment.strip()), "a non-empty experiment name")]


@dataclass
class CacheConfig:
    dir: str = ".pqsweep_cache"  # cached baselines, keyed by the hash of what shaped them

    def checks(self) -> list[Check]:
        return []


# What a run measures (MLflow metric names), each with the direction that makes it better; a sweep's
# `study.objectives` are chosen among those with a direction, and the sweeper takes its directions from here.
METRICS: dict[str, str | None] = {
    "top1": "maximize", "top5": "maximize", "top1_delta": "maximize", "baseline_top1": "maximize",
    "params_total": "minimize", "params_nonzero": "minimize", "sparsity": "maximize", "macs": "minimize",
    "size_mb": "minimize", "size_gzip_mb": "minimize", "size_sparse_mb": "minimize", "size_theoretical_mb": "minimize",
    "reduction_factor": "maximize", "reduction_factor_gzip": "maximize",
    "latency_ms_p50": "minimize", "latency_ms_p90": "minimize", "export_max_abs_diff": "minimize",
    "params_trainable": None,  # parameters of the float model that train.trainable lets train: a fact, not a goal
    "latency_threads": None,  # a setting recorded as a metric, not something to optimise
}
OBJECTIVES = [name for name, direction in METRICS.items() if direction]


def directions(objectives) -> list[str]:
    """Optuna's direction for each objective: derived, never repeated in a sweep file."""
    return [METRICS[name] for name in objectives]


@dataclass
class StudyConfig:
    name: str = "adhoc"  # the `sweep` tag of every run; sweep files set it
    objectives: List[str] = field(default_factory=lambda: ["top1"])  # metrics the task returns, in order
    # Where the Optuna study is kept: an Optuna storage URL (sqlite:///, postgresql+psycopg://) or a journal file
    # (*.journal). null: optuna.journal beside the MLflow SQLite store (pqsweep.study.default_storage).
    storage: Optional[str] = None
    trial: Optional[int] = None  # set by the sweeper: this run's Optuna trial number
    # A deployment budget, e.g. [size_gzip_mb<=0.02, top1_delta>=-1]: bounds on metrics (METRICS) that TPE and
    # NSGA-II are told as Optuna constraints, so they spend their trials inside it; a grid runs every point anyway.
    # The sweeper parses them (pqsweep.reports.pareto.parse_bounds) and refuses a bad one before it opens a store:
    # checked here, they would make this module import the reports, which import it.
    constraints: List[str] = field(default_factory=list)

    def checks(self) -> list[Check]:
        ok = bool(self.objectives) and all(name in OBJECTIVES for name in self.objectives)
        return [Check("objectives", list(self.objectives), ok, f"metric names among {', '.join(OBJECTIVES)}")]


# Never test: the amounts a sensitivity scan chooses are a decision, and test data must not make it.
SENSITIVITY_SPLITS = ("val", "train")


@dataclass
class SensitivityConfig:
    """`pqsweep-sensitivity`: prune each layer alone with the chosen per-layer pruning option, and record accuracy."""

    amounts: List[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    split: str = "val"  # accuracy measured here (SENSITIVITY_SPLITS); choosing amounts on test would leak it
    tolerance: float = 1.0  # per-layer amount written = largest amount whose top-1 drop stays within this (pp)
    output: str = "layer_amounts.yaml"  # relative paths resolve against the launch directory

    def checks(self) -> list[Check]:
        amounts = list(self.amounts)
        return [
            Check("amounts", amounts, bool(amounts) and all(0 <= a < 1 for a in amounts),
                  "a non-empty list of fractions in [0, 1)"),
            Check("split", self.split, self.split in SENSITIVITY_SPLITS,
                  f"one of {', '.join(SENSITIVITY_SPLITS)} (test would leak into the amounts chosen)"),
            Check("tolerance", self.tolerance, self.tolerance >= 0, "a top-1 drop in pp, >= 0"),
        ]


@dataclass
class Config:
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
    export: Export = Export.none  # write the compressed model as an MLflow artifact, checked against eager outputs
    device: str = "cpu"  # training device; evaluation of quantized models is always on the CPU
    scale: str = "cpu"  # set by conf/scale/: the size a paper's sweep file runs at (SCALES); its ${paper_cpu:..} read it


# A sweep file that reproduces a paper runs at either size: a value that differs is written ${paper_cpu:200,2} (the
# paper's, then cpu's), and the data set as `override /dataset: ${scale}/cifar10` (conf/dataset/paper/, cpu/).
SCALES = ("paper", "cpu")


def divided(a: Any, b: Any) -> float | None:
    """The resolver ${div:a,b}, as train.finetune_lr's default uses it; None where either is no number, so that the
    check of the key the user typed (train.optimizer.lr=fast) answers, not this derived one."""
    return a / b if number(a) and number(b) and b else None


def paper_cpu(paper: Any, cpu: Any, *, _root_: DictConfig) -> Any:
    """The resolver ${paper_cpu:<paper value>,<cpu value>}: the one of the run's scale."""
    return paper if _root_.scale == "paper" else cpu


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
        ("schema/quantization", "quantization", QuantizationConfig),
        ("schema/quantization", "int8", Int8Config),
        ("schema/quantization", "qat", QATConfig),
        ("schema/quantization", "mixed", MixedConfig),
        ("schema/quantization", "fake_quant", FakeQuantConfig),
        ("schema/train", "train", TrainConfig),
    ]:
        cs.store(group=group, name=name, node=node, replace=True)


class ConfigError(ValueError):
    """A config value outside its allowed range; the message is one line naming the key."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


GROUPS = ("model", "dataset", "pruning", "quantization", "train", "measure", "tracking", "cache", "study",
          "sensitivity")


def visible_cuda(device: str) -> Check:
    """device=cuda[:N] names a GPU this process sees. torch loads only here, for a run that would load it anyway."""
    import torch

    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    seen = f"cpu, or cuda:N with N < {count} (the CUDA devices visible)" if count else \
        "cpu: no CUDA device is visible (torch.cuda.device_count() is 0)"
    return Check("device", device, index < count, seen)


def validate(cfg: DictConfig) -> None:
    """Every group's own checks, then the rules between groups. Raises ConfigError before any data is loaded."""
    checks = []
    for group in GROUPS:
        schema = OmegaConf.get_type(cfg[group])
        checks += [check._replace(key=f"{group}.{check.key}") for check in schema.checks(cfg[group])]
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
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value} is not allowed: must be {allowed}", key=key)
