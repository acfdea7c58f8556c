"""The papers' structural numbers (params, size at a precision, MACs) from pqsweep's own models at the papers'
resolutions: they depend on the architecture, not on the data or the training, so they must match within 1 %.

Each row cites where the number is printed. Units are the paper's: seed 003 gives its sizes in MiB (2^20 bytes),
the others in MB (10^6); seed 002's "FLOPs" are multiply-accumulates as pqsweep counts them (conv and linear).
"""

from __future__ import annotations

import math

import pytest
import torch

from pqsweep import measure, models
from pqsweep.pipeline import run

pytestmark = pytest.mark.slow

MIB = 2**20 / 1e6  # MB per MiB

# (paper, where, model builder, classes, image px, metric, value as printed, our value -> the paper's unit)
FP32 = [
    ("000", "ResNet-18 on CIFAR-10, total params", "resnet18", 10, 224, "params_total", 11_181_642, 1),
    ("000", "ResNet-18 on CIFAR-10, fp32 size (MB)", "resnet18", 10, 224, "size_mb", 44.81, 1),
    ("000", "VGG16-BN on CIFAR-10, total params", "vgg16_bn", 10, 224, "params_total", 134_309_962, 1),
    ("000", "VGG16-BN on CIFAR-10, fp32 size (MB)", "vgg16_bn", 10, 224, "size_mb", 537.31, 1),
    ("001", "ResNet-18 on ImageNet, Table 1 FP32 size (MB)", "resnet18", 1000, 224, "size_mb", 46.83, 1),
    ("002", "CIFAR ResNet-18, total parameters", "resnet18_cifar", 10, 32, "params_total", 11_173_962, 1),
    ("002", "CIFAR ResNet-18, FLOPs", "resnet18_cifar", 10, 32, "macs", 556_651_520, 1),
]
# Seed 003 prints 1-2 significant digits and truncates (ShuffleNetV2's 1,263,854 params print as 1.2 M, its 4.98 MiB
# as 4.9 MB): ours must truncate to exactly what is printed. (where, builder, px, metric, printed, decimals, unit)
TRUNCATED = [
    ("MobileNetV2, params (M)", "mobilenet_v2", 32, "params_total", 2.2, 1, 1e6),
    ("MobileNetV2, size (MiB)", "mobilenet_v2", 32, "size_mb", 8.7, 1, MIB),
    ("ShuffleNetV2, params (M)", "shufflenet_v2", 32, "params_total", 1.2, 1, 1e6),
    ("ShuffleNetV2, size (MiB)", "shufflenet_v2", 32, "size_mb", 4.9, 1, MIB),
    ("AlexNet, params (M)", "alexnet", 224, "params_total", 57, 0, 1e6),
    ("AlexNet, size (MiB)", "alexnet", 224, "size_mb", 217.6, 1, MIB),
]


def structure(builder: str, classes: int, px: int) -> dict[str, float]:
    model = getattr(models, builder)(num_classes=classes, in_channels=3).eval()
    return {**measure.parameter_counts(model), **measure.sizes(model),
            "macs": measure.macs(model, torch.randn(1, 3, px, px))}


@pytest.mark.parametrize("paper, where, builder, classes, px, metric, expected, factor", FP32,
                         ids=[f"{row[0]}-{row[1]}" for row in FP32])
def test_fp32_structure_matches_the_paper(paper, where, builder, classes, px, metric, expected, factor):
    assert structure(builder, classes, px)[metric] * factor == pytest.approx(expected, rel=0.01), where


@pytest.mark.parametrize("where, builder, px, metric, printed, decimals, unit", TRUNCATED, ids=[r[0] for r in TRUNCATED])
def test_seed_003_structure_truncates_to_what_it_prints(where, builder, px, metric, printed, decimals, unit):
    ours = structure(builder, 10, px)[metric] / unit
    assert math.floor(ours * 10**decimals) / 10**decimals == pytest.approx(printed), f"{where}: ours {ours:.4f}"


# Sizes that need a quantized model: a real run on fake data at the paper's resolution (training changes no size).
QUANTIZED = [
    ("000", "ResNet-18 on CIFAR-10, static int8 (MB)", ["model=resnet18", "dataset.num_classes=10",
                                                        "quantization=static_int8"], 11.31),
    ("001", "ResNet-18 on ImageNet, Table 3 FP16 (MB)", ["model=resnet18", "dataset.num_classes=1000",
                                                         "quantization=fp16"], 23.43),
    ("001", "ResNet-18 on ImageNet, Table 2 INT8 (MB)", ["model=resnet18", "dataset.num_classes=1000",
                                                         "quantization=static_int8"], 11.83),
]


@pytest.mark.parametrize("paper, where, overrides, expected", QUANTIZED, ids=[f"{r[0]}-{r[1]}" for r in QUANTIZED])
def test_quantized_sizes_match_the_paper(make_cfg, paper, where, overrides, expected):
    cfg = make_cfg("dataset=fake", "dataset.image_size=224", "dataset.num_samples=40", "train.epochs=0",
                   "train.batch_size=8", "measure.repeats=2", "measure.warmup=0", "measure.top5=false",
                   *([] if "quantization=fp16" in overrides else ["quantization.calibration_batches=1"]),
                   *overrides, tiny=False)
    assert run(cfg).metrics["size_mb"] == pytest.approx(expected, rel=0.01), where


def test_seed_001_mixed_size_is_its_int8_size_plus_an_fp32_head(make_cfg):
    """Table 4 (FP32 fc, INT8 rest) prints 14.29 MB. Its own Table 2 (INT8, 11.83 MB) plus the fc's 513,000 weights
    and biases at 4 bytes instead of 1 gives 13.37 MB: the paper's custom format holds 0.92 MB more than that, which
    no standard option reproduces. pqsweep's `mixed` must give the arithmetic, and the gap is recorded here."""
    cfg = make_cfg("dataset=fake", "dataset.image_size=224", "dataset.num_samples=40", "dataset.num_classes=1000",
                   "model=resnet18", "quantization=mixed", "quantization.calibration_batches=1", "train.epochs=0",
                   "train.batch_size=8", "measure.repeats=2", "measure.warmup=0", "measure.top5=false", tiny=False)
    head = 512 * 1000 + 1000
    expected = 11.83 + head * 3 / 1e6  # the paper's INT8 size, with the head's 1-byte weights made 4-byte
    ours = run(cfg).metrics["size_mb"]
    assert ours == pytest.approx(expected, rel=0.01)
