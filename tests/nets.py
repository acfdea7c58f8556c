"""The small nets, data and config composition that the stage tests share, built and trained the same way in each.

Imported by the test modules (`from nets import ...`); pytest puts tests/ on sys.path for conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pqsweep import models, pipeline
from pqsweep.config import register
from pqsweep.data import DataSplits
from pqsweep.train import Context

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register()


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides))


def load_digits() -> DataSplits:
    """The embedded digits (8x8, 10 classes) as the pipeline loads them."""
    return pipeline.load_data(compose_cfg("dataset=digits"))[0]


def calibration_context(batches: list, train_cfg=None) -> Context:
    """What the pipeline hands a quantizer, with `batches` as the training loader (calibration, QAT)."""
    return Context(loaders={"train": batches}, example=batches[0][0][:1] if batches else None, train_cfg=train_cfg)


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.small_cnn(num_classes=10, in_channels=1).eval()


def wide_convnet() -> nn.Module:
    """A net for 8x8 digits whose 280 k weights dominate its file, so size ratios show the storage precision.

    Most weights sit in the first Linear layer, where they cost one MAC each per image, so training stays fast.
    The first conv has no bias (as in ResNets) and the second has one, so both cases of Conv+BN folding occur.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def train_briefly(model: nn.Module, data: Dataset, epochs: int) -> nn.Module:
    """Adam at 1e-3, batches of 64 in a seeded order: the same trained net whichever test builds it first."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)
