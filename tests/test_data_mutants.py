"""What data.py's own tests left open (found by mutation testing): a raw/ folder or a CIFAR-10 folder that lacks some
of its files, the download flag reaching torchvision, the ImageNet message's fix in full, a root that is not the
working directory, a root set to null, and missing files left to a download where the set has one."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import datasets

from pqsweep import data

from nets import compose_cfg, write_cifar10, write_idx, write_image_folder


def dataset_cfg(*overrides: str):
    return compose_cfg(*overrides).dataset


def test_an_idx_folder_missing_one_file_names_that_file(tmp_path):
    # raw/ exists: only a check of every file (not of the folder) finds the one that is gone
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"(expected {raw / 't10k-labels-idx1-ubyte'})")):
        data.mnist(dataset_cfg("dataset=mnist", f"dataset.root={tmp_path}"))


class Recorded(datasets.MNIST):
    """torchvision's MNIST reader, recording the download flag each split was asked for."""

    download_flags: list = []

    def __init__(self, root, train=True, transform=None, download=False):
        Recorded.download_flags.append(download)
        super().__init__(root, train=train, transform=transform, download=False)


@pytest.mark.parametrize("download", [True, False])
def test_download_reaches_torchvision_as_set(tmp_path, download, monkeypatch):
    write_idx(tmp_path / "Recorded" / "raw")
    monkeypatch.setattr(Recorded, "download_flags", [])
    cfg = dataset_cfg("dataset=mnist", f"dataset.root={tmp_path}", f"dataset.download={str(download).lower()}")
    data._idx_set(cfg, Recorded, "MNIST", data.MNIST_STATS)
    assert Recorded.download_flags == [download, download]  # train and test


def test_imagenet_without_folders_says_how_to_lay_them_out(tmp_path):
    fix = "; put ImageFolder-style train/<class>/ and val/<class>/ folders there (no automatic download)"
    with pytest.raises(FileNotFoundError) as err:
        data.imagenet(dataset_cfg("dataset=imagenet", f"dataset.root={tmp_path}", "dataset.download=true"))
    assert str(err.value).endswith(fix)


def test_imagenet_reads_its_root_not_the_working_directory(tmp_path, monkeypatch):
    root, elsewhere = tmp_path / "imagenet", tmp_path / "cwd"
    write_image_folder(root)
    write_image_folder(elsewhere, classes=("ant", "bee"))  # what a path relative to the cwd would find
    monkeypatch.chdir(elsewhere)
    splits = data.imagenet(dataset_cfg("dataset=imagenet", f"dataset.root={root}", "dataset.resize=32"))
    assert splits.num_classes == 3 and splits.test.classes == ["cat", "dog", "fish"]


def test_num_samples_equal_to_the_whole_set_leaves_the_splits_as_they_are(digits):
    # as many as there are: nothing is cut, so the in-memory splits stay tensors the data cache can hold
    whole = len(digits.train) + len(digits.val) + len(digits.test)
    assert data.limited(digits, whole) is digits
    assert data.limited(digits, whole - 1) is not digits


def test_a_split_whose_share_rounds_to_none_keeps_one_image(digits):
    # digits' 1293 / 144 / 360 cut to 5: shares 3.6, 0.4 and 1.0 round to 4, 0 and 1; the empty one keeps one
    assert [len(digits.train), len(digits.val), len(digits.test)] == [1293, 144, 360]
    cut = data.limited(digits, 5)
    assert [len(cut.train), len(cut.val), len(cut.test)] == [4, 1, 1]


# --- what the second round found: _require's own cases, the CIFAR-10 batch files one by one, its download flag --

def test_a_root_set_to_null_says_which_set_needs_a_directory():
    with pytest.raises(FileNotFoundError) as err:
        data.mnist(dataset_cfg("dataset=mnist", "dataset.root=null"))
    assert str(err.value) == "dataset.root is not set: MNIST needs a directory; set dataset.root=<path>"


def test_missing_files_are_left_to_the_download_where_the_set_has_one(tmp_path):
    # download=true: _require hands the root on for torchvision to fill; only a set without a download refuses
    cfg = dataset_cfg("dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=true")
    assert data._require(cfg, "MNIST", ["MNIST/raw/train-images-idx3-ubyte"]) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no MNIST files there"):
        data._require(cfg, "MNIST", ["MNIST/raw/train-images-idx3-ubyte"], downloadable=False)


def test_the_files_are_looked_for_under_root_not_the_working_directory(tmp_path, monkeypatch):
    root, empty = tmp_path / "data", tmp_path / "empty"
    write_idx(root / "MNIST" / "raw")
    empty.mkdir()
    monkeypatch.chdir(empty)  # the files are under root only
    assert len(data.mnist(dataset_cfg("dataset=mnist", f"dataset.root={root}")).test) == 10
    monkeypatch.chdir(root)  # and here only where the working directory is
    with pytest.raises(FileNotFoundError, match=re.escape(f"dataset.root={empty}: no MNIST files there")):
        data.mnist(dataset_cfg("dataset=mnist", f"dataset.root={empty}"))


def test_a_cifar10_folder_missing_one_batch_names_that_batch(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"(expected {batch})")):
        data.cifar10(dataset_cfg("dataset=cifar10", f"dataset.root={tmp_path}"))


@pytest.mark.parametrize("download", [True, False])
def test_cifar10s_download_reaches_torchvision_as_set(tmp_path, download, monkeypatch):
    flags = []

    class Recorded(data._local_cifar10()):
        """pqsweep's CIFAR-10 reader, recording the download flag each split was asked for."""

        def __init__(self, root, train=True, transform=None, download=False):
            flags.append(download)
            super().__init__(root, train=train, transform=transform, download=False)

    write_cifar10(tmp_path)
    monkeypatch.setattr(data, "_local_cifar10", lambda: Recorded)
    cfg = dataset_cfg("dataset=cifar10", f"dataset.root={tmp_path}", f"dataset.download={str(download).lower()}")
    assert len(data.cifar10(cfg).test) == 6
    assert flags == [download, download]  # train and test


def test_mnist5k_pixels_are_scaled_to_0_1_before_mnists_fixed_stats():
    # mnist5k normalises with MNIST's published mean and std, not its own: its 0..255 bytes must become 0..1 first
    splits = data.mnist5k(dataset_cfg("dataset=mnist5k"))
    pixels = splits.train.tensors[0]
    (mean,), (std,) = data.MNIST_STATS
    assert pixels.min().item() == pytest.approx((0 - mean) / std, abs=1e-5)
    assert pixels.max().item() == pytest.approx((1 - mean) / std, abs=1e-5)  # a 255 pixel


def test_digits_splits_keep_each_class_share_in_test_and_in_val():
    # stratified: each class is 20 % of test and 10 % of what is left, give or take the one image rounding moves
    splits = data.digits(dataset_cfg("dataset=digits"))
    counts = {name: torch.bincount(getattr(splits, name).tensors[1], minlength=10) for name in ("train", "val", "test")}
    total = counts["train"] + counts["val"] + counts["test"]
    assert (counts["test"] - 0.2 * total).abs().max() <= 1
    assert (counts["val"] - 0.1 * (total - counts["test"])).abs().max() <= 1


def test_a_resize_that_shrinks_the_digits_antialiases_them():
    from sklearn.datasets import load_digits

    splits = data.digits(dataset_cfg("dataset=digits", "dataset.resize=4"))
    raw = torch.as_tensor(load_digits().images / 16.0, dtype=torch.float32).unsqueeze(1)

    def shapes(x):  # each image up to the one affine map the normalisation applies to every image alike
        flat = x.flatten(1).double()
        low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        return ((flat - low) / (high - low))[(high > low).squeeze(1)]

    ours = shapes(splits.test.tensors[0])

    def worst(expected):  # how far our worst image is from the nearest expected one
        return torch.cdist(ours, shapes(expected), p=float("inf")).min(1).values.max().item()

    size = dict(size=(4, 4), mode="bilinear", align_corners=False)
    assert worst(F.interpolate(raw, antialias=True, **size)) < 1e-4
    assert worst(F.interpolate(raw, antialias=False, **size)) > 1e-2  # what a resize without antialiasing gives


def test_in_memory_images_of_several_channels_are_normalised_channel_by_channel():
    # digits and mnist5k have one channel; _tensor_splits takes any [N, C, H, W] and any integer labels
    generator = torch.Generator().manual_seed(0)
    scale, shift = torch.tensor([1.0, 2.0, 5.0]).view(1, 3, 1, 1), torch.tensor([0.0, 10.0, 100.0]).view(1, 3, 1, 1)
    x = torch.rand(100, 3, 4, 4, generator=generator) * scale + shift
    y = np.arange(100, dtype=np.int32) % 2  # not int64: the model's loss wants int64 labels all the same
    splits = data._tensor_splits(dataset_cfg("dataset=digits"), x, y)
    images, labels = splits.train.tensors
    assert torch.allclose(images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(images.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5)
    assert labels.dtype == torch.int64 and (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, 4)
