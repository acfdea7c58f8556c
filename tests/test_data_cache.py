"""The data cache: an in-memory data set's splits are built once, then loaded, identical to the last bit."""

from __future__ import annotations

import pytest
import torch

from pqsweep import pipeline
from pqsweep.identity import stage_key

from nets import stage_path


def data_key(cfg) -> str:
    return stage_key(cfg, "data")


def test_second_load_comes_from_the_cache_and_is_identical(make_cfg, monkeypatch):
    cfg = make_cfg("dataset=digits")
    built = pipeline.load_splits(cfg)
    assert stage_path(cfg, "data").is_file()

    def no_build(_):
        raise AssertionError("the builder ran although its splits were cached")

    monkeypatch.setattr("pqsweep.data.digits", no_build)
    loaded = pipeline.load_splits(cfg)
    for name in ("train", "val", "test"):
        for mine, theirs in zip(getattr(loaded, name).tensors, getattr(built, name).tensors):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    assert (loaded.num_classes, loaded.in_channels, loaded.image_size) == (10, 1, 8)
    image, label = loaded.train[0]
    assert isinstance(label, int) and image.shape == (1, 8, 8)  # items as the built set gives them


def test_the_key_follows_what_shapes_the_splits(make_cfg):
    base = data_key(make_cfg("dataset=digits"))
    assert data_key(make_cfg("dataset=digits", "dataset.split_seed=1")) != base
    assert data_key(make_cfg("dataset=digits", "dataset.val_fraction=0.2")) != base
    assert data_key(make_cfg("dataset=mnist5k")) != base
    assert data_key(make_cfg("dataset=digits", "dataset.download=true")) == base  # downloading changes no data
    assert data_key(make_cfg("dataset=digits", "dataset.root=/elsewhere")) == base  # nor where the files lie
    assert data_key(make_cfg("dataset=digits", "train.seed=3", "model=resnet18_cifar")) == base


@pytest.mark.parametrize("dataset", ["fake"])
def test_sets_read_from_files_are_not_copied_into_the_cache(make_cfg, dataset):
    cfg = make_cfg(f"dataset={dataset}")
    pipeline.load_splits(cfg)
    assert not stage_path(cfg, "data").exists()
