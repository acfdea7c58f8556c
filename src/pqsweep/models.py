"""Model factories: `fn(num_classes, in_channels, pretrained) -> nn.Module`, one per `conf/model/*.yaml` option.

The pipeline calls `hydra.utils.get_method(cfg.model._target_)(num_classes=..., in_channels=..., pretrained=...)`.
Torchvision models keep their architecture; only the first conv (when the data set is not RGB) and the classifier
head (when it has not 1000 classes) are replaced. ImageNet weights come from the local torch hub cache only: a run
never downloads, so a missing file fails at once with a message that says where to put it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import functools

import torch
from torch import nn


class _Spec(NamedTuple):
    """Where a torchvision architecture keeps what the data set decides."""

    build: Callable[..., nn.Module]
    weights: object  # the DEFAULT ImageNet weights (a torchvision WeightsEnum member)
    stem: str  # dotted path of the first conv
    head: str  # dotted path of the final nn.Linear


@functools.lru_cache(maxsize=1)
def _specs() -> dict[str, _Spec]:
    import torchvision.models as tvm  # ~2 s to import: only the torchvision architectures need it

    return {
        "resnet18": _Spec(tvm.resnet18, tvm.ResNet18_Weights.DEFAULT, "conv1", "fc"),
        "resnet18_cifar": _Spec(tvm.resnet18, tvm.ResNet18_Weights.DEFAULT, "conv1", "fc"),
        "vgg16_bn": _Spec(tvm.vgg16_bn, tvm.VGG16_BN_Weights.DEFAULT, "features.0", "classifier.6"),
        "alexnet": _Spec(tvm.alexnet, tvm.AlexNet_Weights.DEFAULT, "features.0", "classifier.6"),
        "mobilenet_v2": _Spec(tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.DEFAULT, "features.0.0", "classifier.1"),
        "shufflenet_v2": _Spec(tvm.shufflenet_v2_x1_0, tvm.ShuffleNet_V2_X1_0_Weights.DEFAULT, "conv1.0", "fc"),
    }


def small_cnn(num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    """The paper's small MNIST CNN: two conv layers, two fully connected.

    The paper gives only the layer count and a 78,170-byte gzipped fp32 file (about 19.5 k parameters). We chose
    conv 8 and 16 channels (3x3, pad 1, each followed by ReLU and 2x2 max-pool), an adaptive average pool to 4x4 so
    the same net runs on 8x8 digits and 28x28 MNIST alike, then Linear(256 -> 64) and Linear(64 -> num_classes):
    18,346 parameters for 1 input channel and 10 classes, at any input size. ReLUs are modules and the graph has no
    in-place ops, so torch.ao FX quantization can trace it and fuse conv+relu.
    """
    if pretrained:
        raise ValueError("model.pretrained=true: small_cnn has no pretrained weights")
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),  # 7x7 at 28 px, 2x2 at 8 px (repeated up to 4x4): a fixed-size flatten
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def resnet18(num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    """Torchvision ResNet-18 with its ImageNet stem (7x7/2 conv and max-pool)."""
    return _torchvision("resnet18", num_classes, in_channels, pretrained)


def resnet18_cifar(num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    """ResNet-18 with the CIFAR stem: a 3x3/1 first conv and no max-pool, so 32 px inputs keep their resolution.

    With pretrained=true every layer but the new first conv (whose kernel shape differs) starts from ImageNet.
    """
    model = _torchvision("resnet18_cifar", num_classes, 3, pretrained)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vgg16_bn(num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    """Torchvision VGG-16 with batch norm."""
    return _torchvision("vgg16_bn", num_classes, in_channels, pretrained)


def alexnet(num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    """Torchvision AlexNet (needs inputs of at least 63 px)."""
    return _torchvision("alexnet", num_classes, in_channels, pretrained)


def mobilenet_v2(num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    """Torchvision MobileNetV2."""
    return _torchvision("mobilenet_v2", num_classes, in_channels, pretrained)


def shufflenet_v2(num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    """Torchvision ShuffleNetV2 x1.0."""
    return _torchvision("shufflenet_v2", num_classes, in_channels, pretrained)


def _torchvision(name: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    """Builds the ImageNet architecture, loads its weights if asked, then fits stem and head to the data set."""
    spec = _specs()[name]
    model = spec.build(weights=None)
    if pretrained:
        model.load_state_dict(_cached_state_dict(name, spec.weights))
    if in_channels != 3:
        _adapt_stem(model, spec.stem, in_channels, reuse_weights=pretrained)
    if num_classes != 1000:
        _replace_head(model, spec.head, num_classes)
    return model


def _cached_state_dict(name: str, weights) -> dict:
    """The weights file from the torch hub cache, where torchvision's own download would have put it."""
    filename = Path(weights.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained=true: {name} ImageNet weights not found at {path}; place {filename} there "
            f"(download from {weights.url} on a machine that is online) or set model.pretrained=false"
        )
    # torch.load directly rather than weights.get_state_dict: same file, and no code path that could go online.
    return torch.load(path, map_location="cpu", weights_only=True)


def _adapt_stem(model: nn.Module, path: str, in_channels: int, reuse_weights: bool) -> None:
    """Replaces the first conv by one taking `in_channels`, with the original's kernel, stride, padding and bias."""
    old: nn.Conv2d = model.get_submodule(path)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
    )
    if reuse_weights:
        with torch.no_grad():
            # A standard trick to reuse pretrained RGB filters on other channel counts: average them over the
            # input channels and repeat. Scaling by 3 / in_channels keeps each filter's sum, so a grey image
            # responds as it would have as an RGB image with three equal channels.
            mean = old.weight.mean(dim=1, keepdim=True)
            new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3 / in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    _set_submodule(model, path, new)


def _replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    """Replaces the final linear layer by a freshly initialised one with `num_classes` outputs."""
    old: nn.Linear = model.get_submodule(path)
    _set_submodule(model, path, nn.Linear(old.in_features, num_classes))


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, module)
