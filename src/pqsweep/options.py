"""The schemas of the groups whose options are methods: model, dataset, pruning and quantization families, with
their enums. Each field declares what it shapes (pqsweep.identity); pqsweep.schema holds the run-wide groups."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, List, Optional

from pqsweep.identity import fact, file_content, label, place, shapes

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
    """What the surviving weights do after pruning. finetune: train on from where they are, train.finetune_epochs at
    the fine-tuning rate. reinit (iterative only): back to their values at initialisation, then retrained (003:
    fine-tune large nets, re-initialise compact ones). weights: back to their values at epoch `rewind_epoch` of the
    baseline's training, then retrained for the rest of its epochs on its learning-rate schedule from that epoch
    (Frankle et al.'s rewinding; Renda et al.). lr: kept as they are, retrained the same way (Renda et al.'s
    learning-rate rewinding)."""

    finetune = "finetune"
    reinit = "reinit"
    weights = "weights"
    lr = "lr"


RETRAINED = (Rewind.weights, Rewind.lr)  # retrained on the baseline's own schedule from rewind_epoch


class Schedule(str, Enum):
    """Per-round targets of iterative pruning. geometric: each round removes the same fraction of what is left
    (Han et al.). gradual: s_t = s_f (1 - (1 - t/n)^3), Zhu & Gupta's automated gradual pruning."""

    geometric = "geometric"
    gradual = "gradual"


class Importance(str, Enum):
    """How structured pruning ranks a layer's filters. l1: Li et al.'s L1 norm of each filter (pqsweep's own, the
    default). The others are Torch-Pruning's criteria as its importance module defines them, over the whole group a
    channel belongs to: l2 (group L2 norm), taylor (|w * dL/dw|, Molchanov et al.), bn_scale (|BN gamma|, network
    slimming), fpgm (distance to the geometric median, He et al.), lamp (Lee et al.), hessian (w^2 times the
    empirical Fisher's diagonal, Optimal Brain Damage) and random."""

    l1 = "l1"
    l2 = "l2"
    taylor = "taylor"
    bn_scale = "bn_scale"
    fpgm = "fpgm"
    lamp = "lamp"
    hessian = "hessian"
    random = "random"


GRADIENT_CRITERIA = (Importance.taylor, Importance.hessian)  # their scores need gradients from training batches


class Rounding(str, Enum):
    """How fake_quant rounds weights to their grid: to the nearest point, or as AdaRound learns from calibration
    batches that each layer's output is reconstructed best (pqsweep.quantization.adaround)."""

    nearest = "nearest"
    adaround = "adaround"


class Export(str, Enum):
    none = "none"
    onnx = "onnx"
    torchscript = "torchscript"


# Fine-tuning happens in the structured stage, the prune stage and QAT (the trial); training, in the baseline too.
FINETUNED = ("structured", "prune", "trial")
TRAINED = ("baseline", *FINETUNED)


@dataclass
class ModelConfig:
    _target_: str = shapes("baseline")  # factory: (num_classes, in_channels, pretrained) -> nn.Module
    name: str = shapes("baseline")  # the option's name, logged as the `model` param
    pretrained: bool = shapes("baseline", default=False)  # torchvision ImageNet weights, from the local torch cache
    # Facts the option file declares about its architecture:
    min_image_size: int = fact(1)  # smallest input side it runs on; validate compares the data set's image size
    weights: Optional[str] = fact(None)  # the checkpoint pretrained=true loads from <torch hub>/checkpoints
    batchnorm: bool = fact(True)  # has BatchNorm layers: train.bn_batches and the bn_scale criterion need them
    # Torch-Pruning's dependency graph traces it, so pruning.importance may name any criterion; false: l1 only
    graph: bool = fact(True)


@dataclass
class DatasetConfig:
    _target_: str = shapes("data", "baseline")  # builder: (**these fields) -> pqsweep.data.DataSplits
    name: str = shapes("data", "baseline")
    # On-disk location for torchvision / ImageFolder sets. A data set is its name and settings: moving its files
    # keeps every cache entry (two folders of different images are two data sets, with names of their own).
    root: Optional[str] = place(None)
    download: bool = place(False)  # let torchvision download (only where a user is online)
    resize: Optional[int] = shapes("data", "baseline", default=None)  # square resize of every image, e.g. 224
    val_fraction: float = shapes("data", "baseline", default=0.1)  # training share held out for validation
    split_seed: int = shapes("data", "baseline", default=0)  # the deterministic split's seed, not the training one
    # Images used in all, train + val + test, each split keeping its share (its first images): a quick run on a real
    # set, or a paper sweep's cpu scale. null: all. The fake set generates this many.
    num_samples: Optional[int] = shapes("data", "baseline", default=None)
    # Facts the option file declares about its data:
    # side of the square images the model gets without resize; null: unknown. A label too: the paper tables of 003
    # tell its CIFAR-10 rows from its FashionMNIST ones by it
    image_size: Optional[int] = label(None)
    files: Dict[str, str] = fact(factory=dict)  # what the builder reads under root -> its format
    # (pqsweep.datafiles.FORMATS); checked before anything runs unless download=true will fetch them
    downloadable: bool = fact(True)  # download=true can fetch `files` (torchvision's sets); false: they must be there
    num_classes: Optional[int] = fact(None)  # how many classes the set has: num_samples must give each 5 images


@dataclass
class FakeDatasetConfig(DatasetConfig):
    """Images made from these fields (torchvision's FakeData, or a researcher's own synthetic set): their size,
    channels and classes shape every image, unlike a real set's image_size, which states a fact."""

    num_samples: int = shapes("data", "baseline", default=512)
    image_size: int = shapes("data", "baseline", default=32)
    channels: int = shapes("data", "baseline", default=3)
    num_classes: int = shapes("data", "baseline", default=10)


@dataclass
class PruningConfig:
    _target_: str = shapes("prune", "curves")  # pruner: (model, cfg, ctx: pqsweep.train.Context) -> pruned model
    name: str = shapes("prune", "curves")
    # fraction of prunable weights (or of filters, for structured options) removed, in [0, 1)
    amount: float = shapes("prune", default=0.0)
    # YAML {layer: amount} (pqsweep-sensitivity writes one); overrides amount. Its content enters the key.
    layer_amounts: Optional[str] = shapes("prune", default=None, key=file_content)
    # {layer: sparsity} given inline, over layer_amounts' file; what an allocation sweep sets for every prunable layer
    # (pqsweep.allocation). Any: Hydra reads an nn.Sequential child's name (0, 3) as an int
    layer_sparsity: Dict[Any, float] = shapes("prune", factory=dict, added=True)
    # Facts the method declares about itself in its option file:
    stored_weights: bool = fact(False)  # prunes weights as stored (fp16, int8): allowed with quantize_then_prune
    per_layer: bool = fact(False)  # takes per-layer amounts (layer_amounts); pqsweep-sensitivity scans such methods
    zeroes_weights: bool = fact(True)  # leaves zeros among the weights (unstructured), which quantization=sparse needs
    # After pruning: fine-tune (the default), or rewind the weights or the learning rate to epoch `rewind_epoch` of the
    # baseline's training and retrain for its remaining epochs (Rewind)
    rewind: Rewind = shapes("prune", default=Rewind.finetune, added=True)
    rewind_epoch: int = shapes("rewind", "prune", default=0, added=True)  # k, in [0, train.epochs)
    unused: List[str] = fact(factory=list)  # keys of the family it ignores: another value than their default is refused


@dataclass
class L1FilterConfig(PruningConfig):
    scope: Scope = shapes("prune", "curves", default=Scope["layer"])  # per-layer ratio (Li et al.), or global
    # true: channels a residual add ties to several convs stay whole, each block's inner ones are pruned (002)
    keep_tied: bool = shapes("prune", "curves", default=False)
    importance: Importance = shapes("prune", "curves", default=Importance.l1, added=True)  # how filters are ranked
    # training batches whose gradients the taylor and hessian criteria score by (other criteria draw none)
    importance_batches: int = shapes("prune", "curves", default=4, added=True)


@dataclass
class StructuredUnstructuredConfig(L1FilterConfig):
    """Filters first, then weights: the filter step is a stage of its own (`structured`), so the points of a grid
    that share it (4 structured x 4 unstructured amounts) prune and fine-tune it once per structured amount."""

    # the filter step (l1_filter at `structured`, then fine-tuning) run and cached as the structured stage
    structured_step: str = shapes("structured", "curves")
    structured: float = shapes("structured", default=0.5)  # fraction of filters removed first
    unstructured: float = shapes("prune", default=0.5)  # then this fraction of the remaining weights (global magnitude)
    scope: Scope = shapes("structured", "curves", default=Scope["layer"])  # of the structured step
    keep_tied: bool = shapes("structured", "curves", default=False)
    layer_amounts: Optional[str] = shapes("structured", default=None, key=file_content)  # the structured step's
    importance: Importance = shapes("structured", "curves", default=Importance.l1, added=True)
    importance_batches: int = shapes("structured", "curves", default=4, added=True)


@dataclass
class GroupNormConfig(PruningConfig):
    """Torch-Pruning's group-norm sparse learning, then its pruner (pqsweep.pruning.group_norm)."""

    scope: Scope = shapes("prune", "curves", default=Scope["layer"])  # each layer's fraction, or one global ranking
    reg: float = shapes("prune", "curves", default=1e-4)  # the group-norm regulariser's coefficient, > 0
    sparse_epochs: int = shapes("prune", "curves", default=2)  # epochs of regularised training before pruning


@dataclass
class IterativeConfig(PruningConfig):
    rounds: int = shapes("prune", "curves", default=3)  # prune -> fine-tune rounds to reach `amount`
    # fine-tuning epochs between rounds (default train.finetune_epochs); reinit retrains from initial values, so it
    # usually wants about train.epochs
    round_epochs: Optional[int] = shapes("prune", "curves", default=None)
    rewind: Rewind = shapes("prune", "curves", default=Rewind.finetune)
    schedule: Schedule = shapes("prune", "curves", default=Schedule.geometric)
    scope: Scope = shapes("prune", "curves", default=Scope["global"])


@dataclass
class QuantizationConfig:
    _target_: str = shapes("trial")  # quantizer: (model, cfg, ctx: pqsweep.train.Context) -> deployable nn.Module
    name: str = shapes("trial")
    bits: int = shapes("trial", default=32)  # storage precision of the weights, reported as the `precision` column
    order: Order = shapes("trial", default=Order.prune_then_quantize)
    # Facts the method declares about itself in its option file:
    export_tolerance: float = fact(1e-4)  # an exported file's logits may differ from eager by this share of the scale
    orders: List[Order] = fact(factory=lambda: list(Order))  # the orders it can be composed in
    # what export= can write of it and reload to the same outputs; `onnx@pt2e`: only with that backend
    exports: List[str] = fact(factory=lambda: ["onnx", "torchscript"])
    needs_zeros: bool = fact(False)  # works on the zeros unstructured pruning leaves (sparse): refused without them
    unused: List[str] = fact(factory=list)  # keys of the family it ignores: another value than their default is refused


@dataclass
class Int8Config(QuantizationConfig):
    bits: int = shapes("trial", default=8)
    engine: Engine = shapes("trial", default=Engine.x86)  # torch.ao quantized engine (fx backend)
    backend: Backend = shapes("trial", default=Backend.fx)  # torch.ao FX, or torchao PT2E, among `backends`
    granularity: Granularity = shapes("trial", default=Granularity.per_channel)  # weights; activations per tensor
    calibration_batches: int = shapes("trial", default=8)  # training batches run through the observers
    backends: List[Backend] = fact(factory=lambda: [Backend.fx])  # the backends the method has
    # Before quantizing (pqsweep.quantization.ptq, Nagel et al. 2019): cross-layer equalization of the float weights,
    # and bias correction of the mean error int8 weight rounding adds (fx backend), on the calibration batches
    equalize: bool = shapes("trial", default=False, added=True)
    bias_correction: bool = shapes("trial", default=False, added=True)


@dataclass
class QATConfig(Int8Config):
    qat_epochs: int = shapes("trial", default=2)  # fine-tuning epochs with fake-quant modules, then int8 conversion
    qat_lr: Optional[float] = shapes("trial", default=None)  # defaults to the fine-tuning learning rate


@dataclass
class MixedConfig(Int8Config):
    # layer name -> fp32 | int8; `head` names the model's last Linear layer. Layers not named are int8. Any: Hydra
    # parses the names of nn.Sequential layers (0, 1, ...) as ints
    layers: Dict[Any, str] = shapes("trial", factory=dict)


@dataclass
class FakeQuantConfig(QuantizationConfig):
    bits: int = shapes("trial", default=8)  # reported precision; set to bits_w by the option file
    bits_w: int = shapes("trial", default=8)  # weight bits, 2..16
    bits_a: int = shapes("trial", default=8)  # activation bits, 2..16
    symmetric: bool = shapes("trial", default=True)  # symmetric (zero-point 0) or asymmetric (affine) ranges
    granularity: Granularity = shapes("trial", default=Granularity.per_channel)  # weights; activations per tensor
    calibration_batches: int = shapes("trial", default=8)  # batches that set the activation ranges (and AdaRound's)
    rounding: Rounding = shapes("trial", default=Rounding.nearest, added=True)  # of the weights
    # Adam steps per layer that AdaRound learns its rounding in (the paper: 10,000; a few hundred on a small net)
    adaround_iterations: int = shapes("trial", default=1000, added=True)
    # {layer: weight bits} over bits_w, for the layers it names: 2..16, or 32 to keep that layer float (its weight
    # unrounded, its input unquantized); what an allocation sweep sets for every prunable layer (pqsweep.allocation)
    layer_bits: Dict[Any, int] = shapes("trial", factory=dict, added=True)
