"""The tests' one helper module: configs composed as the app composes them, the small nets, the Context they get, and
tiny data sets written on disk in their real formats.

conftest.py turns the stateful parts into fixtures (the digits splits, the trained nets, configs whose paths point at
tmp_path); test modules import the rest (`from nets import ...`; pytest puts tests/ on sys.path), e.g. `options` to
parametrize at collection time.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import pickle
import struct
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.utils import get_method
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pqsweep import measure, models
from pqsweep.cache import store
from pqsweep.identity import stage_key
from pqsweep.preflight import CONFIG_MODULE
from pqsweep.schema import register
from pqsweep.train import Context

# The configs the installed app loads (pkg://pqsweep.conf; in a checkout, src/pqsweep/conf links to conf/).
CONF_DIR = Path(str(importlib.resources.files(CONFIG_MODULE)))
register()

# Small enough for CI's two cores; real enough that every stage does its work.
TINY = ["train.epochs=2", "train.finetune_epochs=1", "measure.warmup=2", "measure.repeats=5"]


def options(group: str) -> list[str]:
    """A group's options, as the files in its folder: a new file is covered without editing any test."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _composed(config_name: str, overrides: tuple[str, ...], hydra: bool) -> DictConfig:
    with initialize_config_module(config_module=CONFIG_MODULE):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


def compose_cfg(*overrides: str, config_name: str = "config", hydra: bool = False) -> DictConfig:
    """The config the app composes from pkg://pqsweep.conf with `overrides`.

    Each override list is composed once per session (composition is the slow part of many small tests) and every
    call gets its own copy, so a test may edit what it gets. Paths stay as configured: tests that write anything
    use the `make_cfg` fixture, which points them at tmp_path.
    """
    return copy.deepcopy(_composed(config_name, tuple(overrides), hydra))


def option(group: str, name: str, *overrides: str) -> DictConfig:
    """The `<group>` node of `<group>=<name>` with `<group>.<key>=<value>` overrides, as a run composes it."""
    return compose_cfg(f"{group}={name}", *(f"{group}.{o}" for o in overrides))[group]


def quantize(name: str, model: nn.Module, ctx: Context | None, *overrides: str) -> nn.Module:
    """`model` through the real `quantization=<name>` (plus `quantization.` overrides), as the pipeline calls it."""
    cfg = option("quantization", name, *overrides)
    return get_method(cfg._target_)(copy.deepcopy(model).eval(), cfg, ctx)


def stage_path(cfg: DictConfig, stage: str) -> Path:
    """Where a run of `cfg` keeps stage `stage`'s cache entry."""
    return store(cfg, stage).path(stage_key(cfg, stage))


def stage_entry(cfg: DictConfig, stage: str) -> dict | None:
    """Stage `stage`'s cache entry for `cfg`, as the stage machinery reads it (None where there is none)."""
    return store(cfg, stage).load(stage_key(cfg, stage))


# --- data and the Context a method is handed ---------------------------------------------------------------------


def loader(data: Dataset, batch_size: int = 64, shuffle: bool = False) -> DataLoader:
    """Batches of `data`, in a seeded order when shuffled: the same batches whichever test asks first."""
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def batches(data: Dataset, n: int, batch_size: int = 64) -> list:
    """The first `n` (images, labels) batches of `data`: a calibration set."""
    return list(islice(loader(data, batch_size), n))


def context(train, train_cfg=None, example: torch.Tensor | None = None, initial_state: dict | None = None,
            kind: type[Context] = Context) -> Context:
    """What the pipeline hands a pruner or quantizer: `train` (a DataLoader or a list of (images, labels) batches) as
    the training loader that calibration, fine-tuning and QAT read, an example input (default: the first image of
    `train`), the `train` config group (fine-tuning needs it), and the weights at initialisation (rewind=reinit)."""
    if example is None and len(train):
        example = next(iter(train))[0][:1]
    return kind({"train": train}, example, train_cfg, initial_state=initial_state)


class RecordingContext(Context):
    """A real Context that keeps a copy of the model before (`seen`) and after (`tuned`) each fine-tuning."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[nn.Module] = []
        self.tuned: list[nn.Module] = []

    def finetune(self, model, epochs=None, lr=None, desc="finetune"):
        self.seen.append(copy.deepcopy(model))
        history = super().finetune(model, epochs, lr, desc)
        self.tuned.append(copy.deepcopy(model))
        return history


# --- the small nets ----------------------------------------------------------------------------------------------


def small_cnn(seed: int = 0) -> nn.Module:
    """The project's small CNN (18,346 parameters) for 1-channel images and 10 classes, seeded."""
    torch.manual_seed(seed)
    return models.small_cnn(num_classes=10, in_channels=1).eval()


def wide_convnet(seed: int = 0) -> nn.Module:
    """A net for 8x8 digits whose 280 k weights dominate its file, so size ratios show the storage precision.

    Most weights sit in the first Linear layer, where they cost one MAC each per image, so training stays fast.
    The first conv has no bias (as in ResNets) and the second has one, so both cases of Conv+BN folding occur.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 256), nn.ReLU(),
        nn.Linear(256, 10),
    ).eval()


NETS = {"small_cnn": small_cnn, "wide_convnet": wide_convnet}


def train_briefly(model: nn.Module, data: Dataset, epochs: int) -> nn.Module:
    """Adam at 1e-3, batches of 64 in a seeded order: the same trained net whichever test builds it first."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    shuffled = loader(data, shuffle=True)  # one generator for all epochs: a new order each epoch
    model.train()
    for _ in range(epochs):
        for x, y in shuffled:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def top1(model: nn.Module, data: Dataset) -> float:
    """Top-1 accuracy (%) on `data`."""
    return measure.accuracy(model, loader(data, batch_size=512))["top1"]


# --- data sets on disk, tiny, in their real formats ---------------------------------------------------------------


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> None:
    """The python version of CIFAR-10: pickled dicts, 3072 bytes per image (R, G, B planes of 32x32).

    The official files are Python 2 pickles whose keys torchvision loads as str (encoding="latin1"), so str keys
    here are their faithful equivalent; bytes keys (b"data") would not be found by torchvision's reader.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(path: Path, n: int, label: str) -> None:
        entry = {
            "batch_label": label,
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        path.write_bytes(pickle.dumps(entry, protocol=2))

    for i in range(1, 6):
        batch(folder / f"data_batch_{i}", per_batch, f"training batch {i} of 5")
    batch(folder / "test_batch", n_test, "testing batch 1 of 1")
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_idx(raw: Path, n_train: int = 20, n_test: int = 10) -> None:
    """MNIST's unpacked IDX files: big-endian header (magic 2051 images / 2049 labels, then the dims), then uint8s."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_image_folder(root: Path, classes=("cat", "dog", "fish"), per_class=(("train", 4), ("val", 2))) -> None:
    """ImageFolder layout root/{train,val}/<class>/*.png, non-square so the resize and centre crop matter."""
    rng = np.random.default_rng(0)
    for split, n in per_class:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def write_data_sets(base: Path) -> Path:
    """Every on-disk option's files under base/<option>, where `PQSWEEP_DATA=base` points the option files' roots."""
    write_cifar10(base / "cifar10")
    write_idx(base / "mnist" / "MNIST" / "raw")
    write_idx(base / "fashion_mnist" / "FashionMNIST" / "raw")
    write_image_folder(base / "imagenet")
    return base


def grid_points(sweep: str, scale: str) -> list[list[str]]:
    """A sweep file's grid points at `scale`, as the overrides the sweeper gives each trial."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = compose_cfg(f"sweep={sweep}", f"scale={scale}", hydra=True).hydra.sweeper.params
    parser = OverridesParser.create()
    axes = [[f"{key}={v}" for v in parser.parse_override(f"{key}={value}").sweep_string_iterator()]
            for key, value in params.items()]
    return [list(point) for point in itertools.product(*axes)]


def experiment_ids(client) -> list[str]:
    """Every experiment of a test's store: each study logs to one of its own (tracking.experiment: ${study.name})."""
    return [e.experiment_id for e in client.search_experiments()]
