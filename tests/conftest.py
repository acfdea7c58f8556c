"""Shared fixtures: configs composed with Hydra's compose API, shrunk, every path pointed at tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pqsweep.config import register

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register()

# Small enough for CI's two cores; real enough that every stage does its work.
TINY = [
    "train.epochs=2",
    "train.finetune_epochs=1",
    "measure.warmup=2",
    "measure.repeats=5",
]


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) -> the resolved config, with MLflow and the cache under tmp_path."""

    def _make(*overrides: str, tiny: bool = True):
        paths = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache"]
        with initialize_config_dir(config_dir=str(CONF_DIR)):
            return compose("config", overrides=(TINY if tiny else []) + paths + list(overrides))

    return _make


@pytest.fixture(autouse=True)
def keep_quantized_engine():
    """The int8 quantizers set torch's global quantized engine; leave it as the next test expects it."""
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@pytest.fixture(scope="module")
def digits():
    """The embedded digits splits (8x8, 10 classes) as the pipeline loads them."""
    from nets import load_digits

    return load_digits()
