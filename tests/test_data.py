"""Data builders: the embedded sets directly, the on-disk formats through tiny files written in the real formats."""

from __future__ import annotations

import re

import hydra
import pytest
import torch

from pqsweep.data import DataSplits

from nets import compose_cfg, write_cifar10, write_idx, write_image_folder


def build(*overrides: str) -> DataSplits:
    """Compose the real config with `overrides` and call the dataset's builder the way the pipeline does."""
    cfg = compose_cfg(*overrides)
    return hydra.utils.get_method(cfg.dataset._target_)(cfg.dataset)


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


# --- fake ------------------------------------------------------------------------------------------------------


def test_fake_shapes_and_splits():
    splits = build("dataset=fake", "dataset.num_samples=50", "dataset.image_size=24", "dataset.channels=3")
    assert sizes(splits) == (36, 4, 10)
    check_items(splits, (3, 24, 24))
    assert_disjoint(splits)  # FakeData's offsets keep the splits apart
    check_items(build("dataset=fake", "dataset.num_samples=20", "dataset.resize=40"), (3, 40, 40))


# --- what the builders default to (each test kills a mutant of data.py that the tests above let live) ----------


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


def test_num_samples_below_one_image_a_split_is_refused_naming_the_key(make_cfg):
    from pqsweep.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"^dataset.num_samples=2 is not allowed: must be null \(all\) or an int"):
        validate(make_cfg("dataset=mnist5k", "dataset.num_samples=2"))
