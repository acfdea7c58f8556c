"""Structured-config schemas: one dataclass per config group, registered in Hydra's ConfigStore.

Each YAML option in `conf/<group>/` starts from its group's schema (`defaults: [/schema/<group>@_here_]`), so a
typo or a wrong type fails at composition with Hydra's own message; ranges are checked by `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig


# Modules whose callables configs may name as `_target_` (Hydra 1.4 asks every instantiate for such a list).
TRUSTED_TARGETS = ["pqsweep.*", "torch.optim.*", "hydra_plugins.*", "optuna.samplers.*", "hydra._internal.*"]


class Backend(str, Enum):
    """Quantized-kernel engines of torch.ao on CPU."""

    x86 = "x86"
    fbgemm = "fbgemm"
    qnnpack = "qnnpack"


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
    _target_: str = MISSING  # pruner: (model, amount) -> None, prunes in place and folds masks
    name: str = MISSING
    amount: float = 0.0  # fraction of prunable weights set to zero, in [0, 1)


@dataclass
class QuantizationConfig:
    _target_: str = MISSING  # quantizer: (model, calibration_loader) -> deployable nn.Module
    name: str = MISSING
    bits: int = 32  # storage precision of the weights, reported as the `precision` column
    backend: Backend = Backend.x86  # torch.ao quantized engine for the int8 options
    per_channel: bool = True  # per-channel weight observers (static_int8)
    calibration_batches: int = 8  # training batches run through the observers (static_int8)


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
        ("schema/quantization", "quantization", QuantizationConfig),
    ]:
        cs.store(group=group, name=name, node=node, replace=True)


# What a run measures (MLflow metric names); a sweep's `study.objectives` are chosen among these.
METRICS = (
    "top1", "top5", "top1_delta", "baseline_top1", "params_total", "params_nonzero", "sparsity", "macs", "size_mb",
    "size_gzip_mb", "reduction_factor", "reduction_factor_gzip", "latency_ms_p50", "latency_ms_p90", "latency_threads",
)


class ConfigError(ValueError):
    """A config value outside its allowed range; the message is one line naming the key."""


def validate(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express. Raises ConfigError before any data is loaded."""
    checks = [
        ("pruning.amount", cfg.pruning.amount, 0.0 <= cfg.pruning.amount < 1.0, "a fraction in [0, 1)"),
        ("quantization.bits", cfg.quantization.bits, cfg.quantization.bits in (8, 16, 32), "one of 8, 16, 32"),
        ("train.epochs", cfg.train.epochs, cfg.train.epochs >= 0, "an integer >= 0"),
        ("train.finetune_epochs", cfg.train.finetune_epochs, cfg.train.finetune_epochs >= 0, "an integer >= 0"),
        ("train.batch_size", cfg.train.batch_size, cfg.train.batch_size >= 1, "an integer >= 1"),
        ("dataset.val_fraction", cfg.dataset.val_fraction, 0.0 < cfg.dataset.val_fraction < 1.0, "in (0, 1)"),
        ("measure.threads", cfg.measure.threads, cfg.measure.threads >= 1, "an integer >= 1"),
        ("measure.repeats", cfg.measure.repeats, cfg.measure.repeats >= 2, "an integer >= 2"),
        ("device", cfg.device, cfg.device.split(":")[0] in ("cpu", "cuda"), "cpu or cuda[:N]"),
    ]
    unknown = [name for name in cfg.study.objectives if name not in METRICS]
    if unknown or not cfg.study.objectives:
        checks.append(("study.objectives", list(cfg.study.objectives), False, f"metric names among {', '.join(METRICS)}"))
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value} is not allowed: must be {allowed}")
