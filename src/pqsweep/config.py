"""Structured-config schemas: one dataclass per config group, registered in Hydra's ConfigStore.

Each YAML option in `conf/<group>/` starts from its group's schema (`defaults: [/schema/<group>@_here_]`), so a
typo or a wrong type fails at composition with Hydra's own message; ranges are checked by `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig


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


@dataclass
class ModelConfig:
    _target_: str = MISSING  # factory: (num_classes, in_channels, pretrained) -> nn.Module
    name: str = MISSING  # the option's name, logged as the `model` param
    pretrained: bool = False  # torchvision ImageNet weights, from the local torch cache only


@dataclass
class DatasetConfig:
    _target_: str = MISSING  # builder: (**these fields) -> pqsweep.data.DataSplits
    name: str = MISSING
    root: Optional[str] = None  # on-disk location for torchvision / ImageFolder sets
    download: bool = False  # let torchvision download (only where a user is online)
    resize: Optional[int] = None  # square resize of every image, e.g. 224 for ImageNet-pretrained nets
    val_fraction: float = 0.1  # share of the training data held out for validation (deterministic)
    split_seed: int = 0  # seed of the deterministic split, independent of the training seed


@dataclass
class FakeDatasetConfig(DatasetConfig):
    num_samples: int = 512
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10


@dataclass
class PruningConfig:
    _target_: str = MISSING  # pruner: (model, cfg, ctx: pqsweep.train.Context) -> the pruned model, masks folded
    name: str = MISSING
    amount: float = 0.0  # fraction of prunable weights (or of filters, for structured options) removed, in [0, 1)
    layer_amounts: Optional[str] = None  # YAML {layer: amount} (pqsweep-sensitivity writes one); overrides amount


@dataclass
class L1FilterConfig(PruningConfig):
    scope: Scope = Scope["layer"]  # per-layer ratio (Li et al.), or one global ranking of filters


@dataclass
class StructuredUnstructuredConfig(L1FilterConfig):
    structured: float = 0.5  # fraction of filters removed first (l1_filter), then fine-tuned
    unstructured: float = 0.5  # then this fraction of the remaining weights (global magnitude), then fine-tuned


@dataclass
class IterativeConfig(PruningConfig):
    rounds: int = 3  # prune -> fine-tune rounds to reach `amount`
    round_epochs: Optional[int] = None  # fine-tuning epochs between rounds (default train.finetune_epochs); reinit
    # retrains from initial values, so it usually wants about train.epochs
    rewind: Rewind = Rewind.finetune
    schedule: Schedule = Schedule.geometric
    scope: Scope = Scope["global"]


@dataclass
class QuantizationConfig:
    _target_: str = MISSING  # quantizer: (model, cfg, ctx: pqsweep.train.Context) -> deployable nn.Module
    name: str = MISSING
    bits: int = 32  # storage precision of the weights, reported as the `precision` column
    order: Order = Order.prune_then_quantize


@dataclass
class Int8Config(QuantizationConfig):
    bits: int = 8
    engine: Engine = Engine.x86  # torch.ao quantized engine (fx backend)
    backend: Backend = Backend.fx  # static_int8 only: torch.ao FX, or torchao PT2E (x86 Inductor quantizer)
    granularity: Granularity = Granularity.per_channel  # weight observers; activations are always per tensor
    calibration_batches: int = 8  # training batches run through the observers (static options)


@dataclass
class QATConfig(Int8Config):
    qat_epochs: int = 2  # quantization-aware fine-tuning epochs with fake-quant modules, then int8 conversion
    qat_lr: Optional[float] = None  # defaults to the fine-tuning learning rate


@dataclass
class MixedConfig(Int8Config):
    # layer name -> fp32 | int8; `head` names the model's last Linear layer. Layers not named are int8.
    layers: Dict[Any, str] = field(default_factory=dict)  # Any: nn.Sequential layers are named 0, 1, ...; Hydra parses those as ints


@dataclass
class FakeQuantConfig(QuantizationConfig):
    bits: int = 8  # reported precision; set to bits_w by the option file
    bits_w: int = 8  # weight bits, 2..16
    bits_a: int = 8  # activation bits, 2..16
    symmetric: bool = True  # symmetric (zero-point 0) or asymmetric (affine) ranges
    granularity: Granularity = Granularity.per_channel  # weights; activations are per tensor
    calibration_batches: int = 8  # batches that set the activation ranges


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


@dataclass
class MeasureConfig:
    eval_batch_size: int = 256
    threads: int = 1  # torch threads during the latency measurement, logged as a param
    warmup: int = 10  # untimed calls before timing
    repeats: int = 50  # timed batch-1 calls; p50/p90 over these
    top5: bool = True


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # relative sqlite paths resolve against the launch directory
    experiment: str = "pqsweep"


@dataclass
class CacheConfig:
    dir: str = ".pqsweep_cache"  # cached baselines, keyed by the hash of what shaped them


@dataclass
class StudyConfig:
    name: str = "adhoc"  # the `sweep` tag of every run; sweep files set it
    objectives: List[str] = field(default_factory=lambda: ["top1"])  # metrics the task returns, in order


class SensitivityMethod(str, Enum):
    magnitude = "magnitude"  # unstructured L1 magnitude within the layer
    l1_filter = "l1_filter"  # whole filters by L1 norm, physically removed


# Never test: the amounts a sensitivity scan chooses are a decision, and test data must not make it.
SENSITIVITY_SPLITS = ("val", "train")


@dataclass
class SensitivityConfig:
    """`pqsweep-sensitivity`: prune each prunable layer alone, and the whole net globally, and record accuracy."""

    method: SensitivityMethod = SensitivityMethod.magnitude
    amounts: List[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    split: str = "val"  # accuracy measured here (SENSITIVITY_SPLITS); choosing amounts on test would leak it
    tolerance: float = 1.0  # per-layer amount written = largest amount whose top-1 drop stays within this (pp)
    output: str = "layer_amounts.yaml"  # relative paths resolve against the launch directory


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


# What a run measures (MLflow metric names); a sweep's `study.objectives` are chosen among these.
METRICS = (
    "top1", "top5", "top1_delta", "baseline_top1", "params_total", "params_nonzero", "sparsity", "macs", "size_mb",
    "size_gzip_mb", "size_sparse_mb", "size_theoretical_mb", "reduction_factor", "reduction_factor_gzip",
    "latency_ms_p50", "latency_ms_p90", "latency_threads", "export_max_abs_diff",
)


def _target(node: DictConfig):
    from hydra.utils import get_method

    return get_method(node._target_)


class ConfigError(ValueError):
    """A config value outside its allowed range; the message is one line naming the key."""


def validate(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express. Raises ConfigError before any data is loaded."""
    p, q = cfg.pruning, cfg.quantization
    fraction = "a fraction in [0, 1)"
    # bits_w first: fake_quant's `bits` follows it, and the error should name the key the user typed
    checks = [(f"quantization.{key}", q[key], 2 <= q[key] <= 16, "an integer in 2..16")
              for key in ("bits_w", "bits_a") if key in q]
    checks += [
        ("pruning.amount", p.amount, 0.0 <= p.amount < 1.0, fraction),
        ("quantization.bits", q.bits, 2 <= q.bits <= 32, "an integer in 2..32"),
        ("train.epochs", cfg.train.epochs, cfg.train.epochs >= 0, "an integer >= 0"),
        ("train.finetune_epochs", cfg.train.finetune_epochs, cfg.train.finetune_epochs >= 0, "an integer >= 0"),
        ("train.batch_size", cfg.train.batch_size, cfg.train.batch_size >= 1, "an integer >= 1"),
        ("dataset.val_fraction", cfg.dataset.val_fraction, 0.0 < cfg.dataset.val_fraction < 1.0, "in (0, 1)"),
        ("measure.threads", cfg.measure.threads, cfg.measure.threads >= 1, "an integer >= 1"),
        ("measure.repeats", cfg.measure.repeats, cfg.measure.repeats >= 2, "an integer >= 2"),
        ("device", cfg.device, cfg.device.split(":")[0] in ("cpu", "cuda"), "cpu or cuda[:N]"),
    ]
    for key in ("structured", "unstructured"):
        if key in p:
            checks.append((f"pruning.{key}", p[key], 0.0 <= p[key] < 1.0, fraction))
    if p.get("layer_amounts"):
        exists = Path(p.layer_amounts).expanduser().is_file()
        checks.append(("pruning.layer_amounts", p.layer_amounts, exists, "an existing YAML file {layer: amount}"))
    if "rounds" in p:
        checks.append(("pruning.rounds", p.rounds, p.rounds >= 1, "an integer >= 1"))
        epochs = p.round_epochs
        checks.append(("pruning.round_epochs", epochs, epochs is None or epochs >= 0, "null or an integer >= 0"))
    if "qat_epochs" in q:
        checks.append(("quantization.qat_epochs", q.qat_epochs, q.qat_epochs >= 0, "an integer >= 0"))
    if "calibration_batches" in q:
        checks.append(("quantization.calibration_batches", q.calibration_batches, q.calibration_batches >= 1,
                       "an integer >= 1"))
    if q.get("backend") == Backend.pt2e:  # only static PTQ has a PT2E path; refuse before training, not after
        static = q._target_ == "pqsweep.quantize.static_int8"
        checks.append(("quantization.backend", "pt2e", static, "fx for every option but static_int8"))
    for layer, precision in (q.get("layers") or {}).items():
        checks.append((f"quantization.layers.{layer}", precision, precision in ("fp32", "int8"), "fp32 or int8"))
    if q.order == Order.quantize_then_prune and not getattr(_target(p), "prunes_stored_weights", False):
        allowed = "none, global_magnitude, layer_magnitude, random"
        checks.append(("pruning", p.name, False, f"an unstructured option with quantization.order="
                       f"quantize_then_prune ({allowed})"))
    sens = cfg.sensitivity
    checks += [
        ("sensitivity.amounts", list(sens.amounts), len(sens.amounts) > 0 and all(0 <= a < 1 for a in sens.amounts),
         "a non-empty list of fractions in [0, 1)"),
        ("sensitivity.split", sens.split, sens.split in SENSITIVITY_SPLITS,
         f"one of {', '.join(SENSITIVITY_SPLITS)} (test would leak into the amounts chosen)"),
        ("sensitivity.tolerance", sens.tolerance, sens.tolerance >= 0, "a top-1 drop in pp, >= 0"),
    ]
    unknown = [name for name in cfg.study.objectives if name not in METRICS]
    if unknown or not cfg.study.objectives:
        checks.append(("study.objectives", list(cfg.study.objectives), False, f"metric names among {', '.join(METRICS)}"))
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value} is not allowed: must be {allowed}")
