"""Stage caches: what an expensive stage produced, stored under the hash of the settings that shaped it (open_lth).

One mechanism, one file per entry (`<stage>-<key>.pt` under `cache.dir`), for every stage that uses it:
- `baseline`: the trained baseline. Change a field that affects training and the key changes; change pruning,
  quantization, fine-tuning or an evaluation setting and every trial reuses the same baseline.
- `pruned`: the pruned and fine-tuned model, shared by every precision of one sparsity in a grid: a trial whose
  prune stage exists only quantizes and measures. Filter-pruned layers keep their new shapes as numbers
  (`weights.structure`), replayed on a fresh model before its weights load, so the entry is tensors only.
- `measured`: the baseline's metrics, measured once per baseline and measurement setting.
- `curves`: a sensitivity scan's per-layer curves, so choosing amounts at another tolerance prunes nothing.
- `data`: the splits of an in-memory data set (digits, mnist5k), so a run on them needs neither the parse nor the
  scikit-learn import of the split again.
Writes are atomic, loads take tensors only (`weights_only`), and a file lock makes parallel trials that need the
same entry compute it once. An entry that cannot be read back (truncated, garbage, empty, missing a field) is moved
aside as `<name>.corrupt-<UTC time>` with one warning, and the stage computes it again. Entries and locks are created
with the umask's permissions (not mkstemp's 0600), so a cache directory shared by a team is usable by all of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Fields that do not change the trained weights: where the data lives, and what happens after baseline training.
NOT_IN_KEY = {
    "model": {"min_image_size", "weights"},  # facts the pre-run check reads
    "dataset": {"root", "download", "image_size", "files", "downloadable"},
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


def pruned_key(cfg: DictConfig) -> str:
    """What shapes the pruned, fine-tuned model: the baseline, the pruning option, fine-tuning and the seed. A
    per-layer amounts file enters by its content, not its path."""
    pruning = OmegaConf.to_container(cfg.pruning, resolve=True)
    if pruning.get("layer_amounts"):
        pruning["layer_amounts"] = hashlib.sha256(Path(pruning["layer_amounts"]).read_bytes()).hexdigest()
    finetune = {k: cfg.train[k] for k in ("finetune_epochs", "finetune_lr")}
    return _digest({"baseline": baseline_key(cfg), "pruning": pruning, "finetune": finetune, "seed": cfg.train.seed})


def measured_key(cfg: DictConfig) -> str:
    return _digest({"baseline": baseline_key(cfg), "measure": OmegaConf.to_container(cfg.measure, resolve=True)})


def curves_key(cfg: DictConfig) -> str:
    """A scan's curves depend on the baseline, the pruning option (less the amounts the scan sets itself), the
    amounts scanned and the split they are measured on; not on the tolerance or the output file."""
    pruning = {k: v for k, v in OmegaConf.to_container(cfg.pruning, resolve=True).items()
               if k not in ("amount", "layer_amounts")}
    scan = {"amounts": sorted(float(a) for a in cfg.sensitivity.amounts), "split": cfg.sensitivity.split}
    return _digest({"baseline": baseline_key(cfg), "pruning": pruning, "scan": scan})


def data_key(cfg: DictConfig) -> str:
    """The data set's splits depend on its whole config (root included: other files, other data), not on download."""
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    return _digest({k: v for k, v in node.items() if k != "download"})


class StageCache:
    """The entries of one stage under `directory`."""

    stage = "stage"
    fields: frozenset[str] = frozenset()  # what a reader of the entry takes from it

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / f"{self.stage}-{key}.pt"

    def load(self, key: str) -> dict | None:
        """The entry, or None when there is none or it cannot be read back (then it is moved aside)."""
        path = self.path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        with f:
            entry, problem = self._read(f)
            if problem is None:
                return entry
            self._set_aside(path, os.fstat(f.fileno()), problem)
            return None

    def _read(self, f) -> tuple[dict | None, str | None]:
        """(entry, None), or (None, what is wrong with the file)."""
        try:
            entry = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as error:  # torch's error depends on how the file is broken: EOFError, OSError, KeyError...
            first_line = next(iter(str(error).strip().splitlines()), "")
            return None, f"{type(error).__name__}: {first_line[:200]}".removesuffix(": ")
        if not isinstance(entry, dict):
            return None, f"holds a {type(entry).__name__}, not a dict"
        missing = self.fields - entry.keys()
        return (None, f"lacks {', '.join(sorted(missing))}") if missing else (entry, None)

    def _set_aside(self, path: Path, read: os.stat_result, reason: str) -> None:
        """Move the unreadable file out of the way, keeping it for whoever wants to look at it.

        The first lookup of `load_splits` runs outside the lock, so another process may already have replaced the
        file with a good one: only the file this process read is moved.
        """
        aside = path.with_name(f"{path.name}.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}")
        try:
            if os.stat(path).st_ino != read.st_ino:
                return  # already replaced by a good entry
            os.replace(path, aside)
        except FileNotFoundError:
            return  # another process moved it first (and said so)
        log.warning("cache entry %s is unreadable (%s); moved to %s, computing it again", path, reason, aside.name)

    def save(self, key: str, entry: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{self.stage}-{key}.{secrets.token_hex(4)}.tmp"
        # os.open's mode goes through the umask (mkstemp's is a fixed 0600), so teammates can read the entry.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(entry, f)
            os.replace(tmp, self.path(key))  # atomic: readers see the old file or the whole new one
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Held while an entry is looked up, computed and saved, so concurrent trials compute it once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # Read-only is enough for flock, so a lock file a teammate created (0644 under umask 022) still opens.
        fd = os.open(self.dir / f".{self.stage}-{key}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


class BaselineCache(StageCache):
    stage = "baseline"
    fields = frozenset({"state_dict", "history"})


class PrunedCache(StageCache):
    """The pruned and fine-tuned model: its weights, the shapes structured pruning gave its layers, and the random
    state the stage left behind (calibration draws from the training loader after it)."""

    stage = "pruned"
    fields = frozenset({"state_dict", "structure", "rng", "loader_rng"})


class MeasuredCache(StageCache):
    """The baseline's own metrics, measured once per baseline and measurement setting."""

    stage = "measured"
    fields = frozenset({"metrics"})


class CurvesCache(StageCache):
    """A sensitivity scan's curves: a second scan with another tolerance or output file prunes nothing."""

    stage = "curves"
    fields = frozenset({"baseline_top1", "rows", "info"})


class DataCache(StageCache):
    stage = "data"
    fields = frozenset({"train", "val", "test", "num_classes", "in_channels", "image_size"})
