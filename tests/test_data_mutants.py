"""What data.py's own tests left open (found by mutation testing): a raw/ folder that lacks some of its files, the
download flag reaching torchvision, the ImageNet message's fix in full, and an image folder that is not the working
directory."""

from __future__ import annotations

import re

import pytest
from torchvision import datasets

from pqsweep import data

from nets import compose_cfg, write_idx, write_image_folder


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
