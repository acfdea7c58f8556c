"""Structured-config schemas: one dataclass per config group (and per method family), registered in Hydra's ConfigStore.

Each YAML option in `conf/<group>/` starts from its family's schema (`defaults: [/schema/<group>/<family>@_here_]`),
so a typo or a wrong type fails at composition with Hydra's own message. Each schema also checks its own ranges
(`checks`), and a method's option file declares the facts other modules need about it (`stored_weights`,
`per_layer`, `backends`, `export_tolerance`), so no module outside a method names it.
`validate` runs every check; it imports no torch, so the pre-run check answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


# Modules whose callables configs may name as `_target_` (Hydra 1.4 asks every instantiate for such a list).
TRUSTED_TARGETS = ["pqsweep.*", "torch.optim.*", "hydra_plugins.*", "optuna.samplers.*", "hydra._internal.*"]


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


# Schemas check themselves: `checks(node)` is called on the composed DictConfig of the group (OmegaConf keeps the
# dataclass as the node's type), so a subclass adds its own checks to its parent's.


@dataclass
class ModelConfig:
    _target_: str = MISSING  # factory: (num_classes, in_channels, pretrained) -> nn.Module
    name: str = MISSING  # the option's name, logged as the `model` param
    pretrained: bool = False  # torchvision ImageNet weights, from the local torch cache only

    def checks(self) -> list[Check]:
        return []


@dataclass
class DatasetConfig:
    _target_: str = MISSING  # builder: (**these fields) -> pqsweep.data.DataSplits
    name: str = MISSING
    root: Optional[str] = None  # on-disk location for torchvision / ImageFolder sets
    download: bool = False  # let torchvision download (only where a user is online)
    resize: Optional[int] = None  # square resize of every image, e.g. 224 for ImageNet-pretrained nets
    val_fraction: float = 0.1  # share of the training data held out for validation (deterministic)
    split_seed: int = 0  # seed of the deterministic split, independent of the training seed

    def checks(self) -> list[Check]:
        return [Check("val_fraction", self.val_fraction, 0.0 < self.val_fraction < 1.0, "in (0, 1)")]


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
            exists = Path(self.layer_amounts).expanduser().is_file()
            checks.append(Check("layer_amounts", self.layer_amounts, exists, "an existing YAML file {layer: amount}"))
            checks.append(Check("layer_amounts", self.layer_amounts, self.per_layer,
                                f"null: pruning={self.name} takes one amount for all layers, not per-layer amounts"))
        return checks


@dataclass
class L1FilterConfig(PruningConfig):
    scope: Scope = Scope["layer"]  # per-layer ratio (Li et al.), or one global ranking of filters


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

    def checks(self) -> list[Check]:
        return [Check("bits", self.bits, 2 <= self.bits <= 32, "an integer in 2..32"),
                Check("export_tolerance", self.export_tolerance, self.export_tolerance > 0, "> 0")]


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
    finetune_lr: Optional[float] = None  # defaults to optimizer.lr / 10
    batch_size: int = 64
    seed: int = 0
    optimizer: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "lr": 1e-3, "weight_decay": 0.0}
    )
    scheduler: Any = None  # e.g. {_target_: torch.optim.lr_scheduler.CosineAnnealingLR, T_max: ${train.epochs}}

    def checks(self) -> list[Check]:
        lr = self.finetune_lr
        return [at_least("epochs", self.epochs, 0), at_least("finetune_epochs", self.finetune_epochs, 0),
                Check("finetune_lr", lr, lr is None or lr > 0, "null (optimizer.lr / 10) or a learning rate > 0"),
                at_least("batch_size", self.batch_size, 1)]


@dataclass
class MeasureConfig:
    eval_batch_size: int = 256
    threads: int = 1  # torch threads during the latency measurement, logged as a param
    warmup: int = 10  # untimed calls before timing
    repeats: int = 50  # timed batch-1 calls; p50/p90 over these
    top5: bool = True

    def checks(self) -> list[Check]:
        return [at_least("eval_batch_size", self.eval_batch_size, 1), at_least("threads", self.threads, 1),
                at_least("warmup", self.warmup, 0), at_least("repeats", self.repeats, 2)]


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # relative sqlite paths resolve against the launch directory
    experiment: str = "pqsweep"

    def checks(self) -> list[Check]:
        return []


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


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent: the CLI and the tests both call it)."""
    cs = ConfigStore.instance()
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
    ]:
        cs.store(group=group, name=name, node=node, replace=True)


class ConfigError(ValueError):
    """A config value outside its allowed range; the message is one line naming the key."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


GROUPS = ("model", "dataset", "pruning", "quantization", "train", "measure", "tracking", "cache", "study",
          "sensitivity")


def validate(cfg: DictConfig) -> None:
    """Every group's own checks, then the rules between groups. Raises ConfigError before any data is loaded."""
    checks = []
    for group in GROUPS:
        schema = OmegaConf.get_type(cfg[group])
        checks += [check._replace(key=f"{group}.{check.key}") for check in schema.checks(cfg[group])]
    p, q = cfg.pruning, cfg.quantization
    checks.append(Check("device", cfg.device, cfg.device.split(":")[0] in ("cpu", "cuda"), "cpu or cuda[:N]"))
    if q.order == Order.quantize_then_prune:
        checks.append(Check("pruning", p.name, p.stored_weights, "an option that prunes stored weights (its option "
                            "file says stored_weights: true) with quantization.order=quantize_then_prune"))
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value} is not allowed: must be {allowed}", key=key)
