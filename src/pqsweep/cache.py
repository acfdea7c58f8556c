"""The stage machinery: each stage of a run computed once under the key of what shapes it, then loaded (open_lth).

`Stages(cfg, random).get(name, compute)` is a stage (pqsweep.stages.STAGES declares each): under a file lock it
looks the entry up, loads it where it is there (restoring the random state the stage hands on), or computes it, saves
it atomically and records it; `cached[name]` says which, for the run's `<stage>_cached` tags. One file per entry,
`<stage>-<key>.pt` under `cache.dir`, holding the key it was saved under. Loads take tensors and numbers only
(`weights_only`). A stage whose training diverged records that instead, and every trial that needs it fails at once
with the same line. An entry that cannot be read back (truncated, garbage, empty, missing a field, another key's) is
moved aside as `<name>.corrupt-<UTC time>` with one warning, and an entry its reader finds unfit (a model whose
layers it does not describe) is computed again. Entries and locks get the umask's permissions (not mkstemp's 0600),
so a cache a team shares is usable by all of it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig

from pqsweep.identity import stage_keys
from pqsweep.stages import STAGES, Random, Stage
from pqsweep.train import Diverged, seed_everything

log = logging.getLogger(__name__)


class Store:
    """The entries of one stage under `directory`: `<stage>-<key>.pt`, with a lock file beside each."""

    def __init__(self, directory: str | os.PathLike, stage: str, holds: frozenset[str] = frozenset()):
        self.dir, self.stage, self.holds = Path(directory), stage, holds

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
            entry, problem = self._read(f, key)
            if problem is None:
                return entry
            self._set_aside(path, os.fstat(f.fileno()), problem)
            return None

    def _read(self, f, key: str) -> tuple[dict | None, str | None]:
        """(entry, None), or (None, what is wrong with the file). An entry holds the key it was saved under (those
        written before entries carried it are taken as named): a file copied over another's name is not trusted."""
        try:
            entry = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as error:  # torch's error depends on how the file is broken: EOFError, OSError, KeyError...
            first_line = next(iter(str(error).strip().splitlines()), "")
            return None, f"{type(error).__name__}: {first_line[:200]}".removesuffix(": ")
        if not isinstance(entry, dict):
            return None, f"holds a {type(entry).__name__}, not a dict"
        if entry.get("key", key) != key:
            return None, f"holds the entry of key {entry['key']}"
        if FAILED in entry:  # the record of a stage that diverged: it holds nothing else
            return entry, None
        missing = self.holds - entry.keys()
        return (None, f"lacks {', '.join(sorted(missing))}") if missing else (entry, None)

    def _set_aside(self, path: Path, read: os.stat_result, reason: str) -> None:
        """Move the unreadable file out of the way, keeping it for whoever wants to look at it. The first lookup runs
        outside the lock, so another process may have replaced the file with a good one: only the file read moves."""
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
                torch.save({**entry, "key": key}, f)
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


def store(cfg: DictConfig, name: str) -> Store:
    """Stage `name`'s entries under cfg.cache.dir; what a kept random state adds, it must hold too."""
    stage = STAGES[name]
    return Store(cfg.cache.dir, name, stage.holds | ({"random"} if stage.random == Random.kept else set()))


@dataclass
class Randomness:
    """The random state a run's stages draw from: torch's global generator, numpy's and Python's (seeded from
    train.seed), and the generators of the run's shuffled loaders. pqsweep's stages draw from torch only, so a kept
    state holds torch's and the loaders'."""

    seed: int
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def capture(self) -> dict[str, torch.Tensor]:
        return {"torch": torch.get_rng_state()} | {name: g.get_state() for name, g in self.generators.items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        for name, generator in self.generators.items():
            generator.set_state(state[name])

    def reseed(self) -> None:
        seed_everything(self.seed)
        for generator in self.generators.values():
            generator.manual_seed(self.seed)


FAILED = "failed"  # an entry that records why the stage failed, for a failure its inputs determine (Diverged)


class Unfit(Exception):
    """A cached entry its reader cannot use for this run (the message says why); the stage is computed again."""


def as_is(value: Any) -> Any:
    return value


NOT_LOADED = object()


@dataclass
class Stages:
    """The stages of one run: their keys, and which ones this run loaded (`cached`) rather than computed."""

    cfg: DictConfig
    random: Randomness
    keys: dict[str, str | None] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # what computing each stage it computed took

    def __post_init__(self):
        self.keys = self.keys or stage_keys(self.cfg)

    def get(self, name: str, compute: Callable[[], Any], save: Callable[[Any], dict | None] = as_is,
            load: Callable[[dict], Any] = as_is) -> Any:
        """Stage `name`'s value: loaded (`load(entry)`) when its entry is cached and fits, else `compute()`d and
        kept as `save(value)` (None: not kept, as for splits read from files). The random state it hands on
        follows its declaration either way."""
        stage, key, entries = STAGES[name], self.keys[name], store(self.cfg, name)
        if key is None:
            raise ValueError(f"stage {name} does not apply to this run")
        value = self._loaded(stage, key, entries, load, warn=False)  # most lookups find it: no lock to wait for
        if value is not NOT_LOADED:
            return value
        with entries.lock(key):
            value = self._loaded(stage, key, entries, load)  # a parallel trial may have computed it meanwhile
            if value is not NOT_LOADED:
                return value
            began = time.perf_counter()
            try:
                value = compute()
            except Diverged as error:  # the same inputs diverge again: the trials that need this stage fail at once
                if stage.cached:
                    entries.save(key, {FAILED: str(error)})
                raise
            entry = save(value)
            if entry is not None and stage.random == Random.kept:
                entry = {**entry, "random": self.random.capture()}
            if stage.random == Random.reseeded:
                self.random.reseed()
            if entry is not None and stage.cached:
                entries.save(key, entry)
            self.seconds[name] = time.perf_counter() - began  # the sweeper's estimate: what a later trial spares
        self.cached[name] = False
        return value

    def _loaded(self, stage: Stage, key: str, entries: Store, load: Callable[[dict], Any], warn: bool = True) -> Any:
        entry = entries.load(key)
        if entry is None:
            return NOT_LOADED
        if FAILED in entry:
            raise Diverged(f"{entry[FAILED]} (recorded as {stage.name} {key} in {entries.path(key)}: these settings "
                           f"diverge; delete the file to train them again)")
        try:
            value = load(entry)
        except Unfit as unfit:
            if warn:  # once, under the lock, before it is computed again
                log.warning("%s %s: cached entry %s; computing it again", stage.name, key, unfit)
            return NOT_LOADED
        if stage.random == Random.kept:
            self.random.restore(entry["random"])
        elif stage.random == Random.reseeded:
            self.random.reseed()
        log.info("%s %s: loaded from cache %s (%s)", stage.name, key, entries.path(key), stage.spares)
        self.cached[stage.name] = True
        return value
