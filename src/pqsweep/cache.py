"""Stage caches: what an expensive stage produced, stored under the hash of the settings that shaped it (open_lth).

One mechanism, one file per entry (`<stage>-<key>.pt` under `cache.dir`), for every stage that uses it:
- `baseline`: the trained baseline. Change a field that affects training and the key changes; change pruning,
  quantization, fine-tuning or an evaluation setting and every trial reuses the same baseline.
- `data`: the splits of an in-memory data set (digits, mnist5k), so a run on them needs neither the parse nor the
  scikit-learn import of the split again.
Writes are atomic, loads take tensors only (`weights_only`), and a file lock makes parallel trials that need the
same entry compute it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

# Fields that do not change the trained weights: where the data lives, and what happens after baseline training.
NOT_IN_KEY = {
    "dataset": {"root", "download"},
    "train": {"finetune_epochs", "finetune_lr"},
}


def _digest(shaping: dict[str, Any]) -> str:
    blob = json.dumps(shaping, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def baseline_key(cfg: DictConfig) -> str:
    shaping: dict[str, Any] = {}
    for group in ("model", "dataset", "train"):
        node = OmegaConf.to_container(cfg[group], resolve=True)
        shaping[group] = {k: v for k, v in node.items() if k not in NOT_IN_KEY.get(group, set())}
    shaping["device"] = cfg.device.split(":")[0]
    return _digest(shaping)


def data_key(cfg: DictConfig) -> str:
    """The data set's splits depend on its whole config (root included: other files, other data), not on download."""
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    return _digest({k: v for k, v in node.items() if k != "download"})


class StageCache:
    """The entries of one stage under `directory`."""

    stage = "stage"

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / f"{self.stage}-{key}.pt"

    def load(self, key: str) -> dict | None:
        path = self.path(key)
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

    def save(self, key: str, entry: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(entry, f)
            os.replace(tmp, self.path(key))  # atomic: readers see the old file or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Held while an entry is looked up, computed and saved, so concurrent trials compute it once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f".{self.stage}-{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class BaselineCache(StageCache):
    stage = "baseline"


class DataCache(StageCache):
    stage = "data"
