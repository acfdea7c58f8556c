"""Data builders: the embedded sets directly, the on-disk formats through tiny files written in the real formats.
Also what the builders check before torchvision reads anything (a root unset, missing or not the working directory,
a folder that lacks one of its files, missing files left to a download where the set has one), the download flag
reaching torchvision, how the in-memory sets are scaled, split and resized, and what num_samples cuts."""

from __future__ import annotations

import re

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import datasets

from pqsweep import data
from pqsweep.data import DataSplits

from nets import compose_cfg, write_cifar10, write_idx, write_image_folder


def dataset_cfg(*overrides: str):
    return compose_cfg(*overrides).dataset


def build(*overrides: str) -> DataSplits:
    """Compose the real config with `overrides` and call the dataset's builder the way the pipeline does."""
    dataset = dataset_cfg(*overrides)
    return hydra.utils.get_method(dataset._target_)(dataset)


def check_items(splits: DataSplits, shape: tuple[int, ...]) -> None:
    for split in (splits.train, splits.val, splits.test):
        image, label = split[0]
        assert image.dtype == torch.float32 and tuple(image.shape) == shape
        assert isinstance(label, int) and 0 <= label < splits.num_classes
    assert (splits.in_channels, splits.image_size, splits.image_size) == shape


def assert_disjoint(splits: DataSplits) -> None:
    """No image is in two splits, nor twice in one: compared by content (every split is normalised alike), so a
    test split drawn from the training data fails however its indices were chosen. The raw images of every set
    here are distinct (the tiny files are random; digits and mnist5k have no duplicates)."""
    seen: dict[str, set[bytes]] = {}
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        images = {split[i][0].numpy().tobytes() for i in range(len(split))}
        assert len(images) == len(split), f"{name} holds an image twice"
        for other, theirs in seen.items():
            assert not images & theirs, f"{name} and {other} share {len(images & theirs)} images"
        seen[name] = images


def sizes(splits: DataSplits) -> tuple[int, int, int]:
    return len(splits.train), len(splits.val), len(splits.test)


# --- embedded sets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, total, side", [("digits", 1797, 8), ("mnist5k", 5000, 28)])
def test_embedded_splits_are_stratified_and_deterministic(name, total, side):
    first, again = build(f"dataset={name}"), build(f"dataset={name}")
    train, val, test = sizes(first)
    assert train + val + test == total
    assert test == pytest.approx(0.2 * total, abs=1) and val == pytest.approx(0.1 * (train + val), abs=1)
    check_items(first, (1, side, side))
    assert compose_cfg(f"dataset={name}").dataset.image_size == side  # the fact its option file declares
    assert_disjoint(first)
    assert first.num_classes == 10
    for a, b in zip((first.train, first.val, first.test), (again.train, again.val, again.test)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
        assert set(a.tensors[1].tolist()) == set(range(10))  # stratified: every class in every split
    reseeded = build(f"dataset={name}", "dataset.split_seed=1")
    assert not torch.equal(first.val.tensors[0], reseeded.val.tensors[0])


def test_digits_are_normalised_with_train_stats():
    images = build("dataset=digits").train.tensors[0]
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4) and images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_resize_of_tensor_sets():
    splits = build("dataset=digits", "dataset.resize=16")
    check_items(splits, (1, 16, 16))
    assert sum(sizes(splits)) == 1797


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


# --- on-disk formats -----------------------------------------------------------------------------------------


def test_cifar10_from_pickled_batches(tmp_path):
    write_cifar10(tmp_path)
    splits = build("dataset=cifar10", f"dataset.root={tmp_path}")
    assert sizes(splits) == (18, 2, 6)  # 20 training images, 10 % of them held out for validation
    assert splits.num_classes == 10
    check_items(splits, (3, 32, 32))
    assert_disjoint(splits)
    resized = build("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.resize=16")
    check_items(resized, (3, 16, 16))


@pytest.mark.parametrize("option, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_formats_from_idx_files(tmp_path, option, folder):
    write_idx(tmp_path / folder / "raw")
    splits = build(f"dataset={option}", f"dataset.root={tmp_path}")
    assert sizes(splits) == (18, 2, 10)
    assert splits.num_classes == 10
    check_items(splits, (1, 28, 28))
    assert_disjoint(splits)
    again = build(f"dataset={option}", f"dataset.root={tmp_path}")
    assert splits.val.indices == again.val.indices  # the held-out share is deterministic
    check_items(build(f"dataset={option}", f"dataset.root={tmp_path}", "dataset.resize=32"), (1, 32, 32))


def test_imagenet_from_image_folders(tmp_path):
    write_image_folder(tmp_path)
    splits = build("dataset=imagenet", f"dataset.root={tmp_path}", "dataset.resize=32")
    assert sizes(splits) == (11, 1, 6)
    assert splits.num_classes == 3
    check_items(splits, (3, 32, 32))
    assert_disjoint(splits)
    assert {label for _, label in splits.test} == {0, 1, 2}


def test_imagenet_refuses_mismatched_class_folders(tmp_path):
    write_image_folder(tmp_path)
    for png in (tmp_path / "val" / "dog").iterdir():
        png.unlink()
    (tmp_path / "val" / "dog").rmdir()
    with pytest.raises(ValueError, match="different class folders"):
        build("dataset=imagenet", f"dataset.root={tmp_path}")


@pytest.mark.parametrize("option", ["cifar10", "mnist", "fashion_mnist", "imagenet"])
def test_missing_root_fails_in_one_line_naming_it(tmp_path, option):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"dataset.root={root}: no ")) as err:
        build(f"dataset={option}", f"dataset.root={root}")
    assert "\n" not in str(err.value)
    assert not root.exists()  # failed before torchvision could create anything


def test_imagenet_cannot_be_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="no automatic download"):
        build("dataset=imagenet", f"dataset.root={tmp_path}", "dataset.download=true")


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


def test_a_root_set_to_null_says_which_set_needs_a_directory():
    with pytest.raises(FileNotFoundError) as err:
        data.mnist(dataset_cfg("dataset=mnist", "dataset.root=null"))
    assert str(err.value) == "dataset.root is not set: MNIST needs a directory; set dataset.root=<path>"


def test_the_files_are_looked_for_under_root_not_the_working_directory(tmp_path, monkeypatch):
    root, empty = tmp_path / "data", tmp_path / "empty"
    write_idx(root / "MNIST" / "raw")
    empty.mkdir()
    monkeypatch.chdir(empty)  # the files are under root only
    assert len(data.mnist(dataset_cfg("dataset=mnist", f"dataset.root={root}")).test) == 10
    monkeypatch.chdir(root)  # and here only where the working directory is
    with pytest.raises(FileNotFoundError, match=re.escape(f"dataset.root={empty}: no MNIST files there")):
        data.mnist(dataset_cfg("dataset=mnist", f"dataset.root={empty}"))


def test_an_idx_folder_missing_one_file_names_that_file(tmp_path):
    # raw/ exists: only a check of every file (not of the folder) finds the one that is gone
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"(expected {raw / 't10k-labels-idx1-ubyte'})")):
        data.mnist(dataset_cfg("dataset=mnist", f"dataset.root={tmp_path}"))


def test_a_cifar10_folder_missing_one_batch_names_that_batch(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"(expected {batch})")):
        data.cifar10(dataset_cfg("dataset=cifar10", f"dataset.root={tmp_path}"))


def test_missing_files_are_left_to_the_download_where_the_set_has_one(tmp_path):
    # download=true: _require hands the root on for torchvision to fill; only a set without a download refuses
    cfg = dataset_cfg("dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=true")
    assert data._require(cfg, "MNIST", ["MNIST/raw/train-images-idx3-ubyte"]) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no MNIST files there"):
        data._require(cfg, "MNIST", ["MNIST/raw/train-images-idx3-ubyte"], downloadable=False)


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


# --- fake ------------------------------------------------------------------------------------------------------


def test_fake_shapes_and_splits():
    splits = build("dataset=fake", "dataset.num_samples=50", "dataset.image_size=24", "dataset.channels=3")
    assert sizes(splits) == (36, 4, 10)
    check_items(splits, (3, 24, 24))
    assert_disjoint(splits)  # FakeData's offsets keep the splits apart
    check_items(build("dataset=fake", "dataset.num_samples=20", "dataset.resize=40"), (3, 40, 40))


# --- what the builders default to, and what num_samples cuts ---------------------------------------------------


def test_imagenet_is_evaluated_at_224_after_the_standard_256_resize_and_centre_crop(tmp_path):
    from PIL import Image
    from torchvision import transforms

    write_image_folder(tmp_path)
    splits = build("dataset=imagenet", f"dataset.root={tmp_path}")  # no dataset.resize: the ImageNet default
    check_items(splits, (3, 224, 224))
    path, _ = splits.test.samples[0]
    stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(*stats)])(Image.open(path).convert("RGB"))
    assert torch.equal(splits.test[0][0], expected)


@pytest.mark.parametrize("option, what", [("cifar10", "CIFAR-10"), ("mnist", "MNIST"),
                                          ("fashion_mnist", "Fashion-MNIST"), ("imagenet", "ImageNet")])
def test_a_missing_root_names_the_data_set_it_expected(tmp_path, option, what):
    with pytest.raises(FileNotFoundError, match=f": no {re.escape(what)} files there"):
        build(f"dataset={option}", f"dataset.root={tmp_path / 'nowhere'}")


def test_fake_images_are_centred_and_keep_at_least_one_validation_image():
    splits = build("dataset=fake", "dataset.num_samples=10", "dataset.val_fraction=0.01", "dataset.num_classes=3")
    assert sizes(splits) == (7, 1, 2)  # 0.01 of 8 rounds to none; one is kept
    pixels = torch.stack([image for image, _ in splits.train])
    assert -1.0 <= pixels.min() < -0.95 and 0.95 < pixels.max() <= 1.0  # (x - 0.5) / 0.5 of pixels in [0, 1]
    labels = {label for split in (splits.train, splits.val, splits.test) for _, label in split}
    assert splits.num_classes == 3 and labels <= {0, 1, 2}


def test_num_samples_cuts_a_real_set_to_its_first_images_each_split_keeping_its_share(make_cfg):
    from pqsweep.pipeline import load_splits

    full = load_splits(make_cfg("dataset=mnist5k", tiny=False))
    assert sizes(full) == (3600, 400, 1000)
    cut = load_splits(make_cfg("dataset=mnist5k", "dataset.num_samples=500", tiny=False))
    assert sizes(cut) == (360, 40, 100)  # a tenth of each split
    for name in ("train", "val", "test"):  # its first images, the same labels
        part, whole = getattr(cut, name), getattr(full, name)
        assert all(torch.equal(part[i][0], whole[i][0]) and part[i][1] == whole[i][1] for i in (0, len(part) - 1))
    assert_disjoint(cut)
    assert sizes(load_splits(make_cfg("dataset=mnist5k", "dataset.num_samples=9000", tiny=False))) == sizes(full)
    assert sizes(load_splits(make_cfg("dataset=fake", "dataset.num_samples=40", tiny=False))) == (29, 3, 8)


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


def test_num_samples_below_one_image_a_split_is_refused_naming_the_key(make_cfg):
    from pqsweep.checks import ConfigError
    from pqsweep.validate import validate

    with pytest.raises(ConfigError, match=r"^dataset.num_samples=2 is not allowed: must be null \(all\) or an int"):
        validate(make_cfg("dataset=mnist5k", "dataset.num_samples=2"))
