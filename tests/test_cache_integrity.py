"""A broken cache entry costs one warning and a recomputation, never a failed trial; entries are shared-readable."""

from __future__ import annotations

import logging
import os
import random

import pytest
import torch
from faults import injects

from pqsweep import data, pipeline
from pqsweep.cache import Store, store
from pqsweep.identity import stage_key
from pqsweep.stages import STAGES

CACHED = ["baseline", "data"]
BREAKAGES = {
    "truncated": lambda good: good[: len(good) // 2],  # a writer killed mid-copy, a full disk
    "garbage": lambda good: random.Random(0).randbytes(len(good)),
    "empty": lambda good: b"",
}


@pytest.fixture
def cached_cfg(make_cfg):
    """A digits config whose run has filled both caches, and that run's metrics."""
    cfg = make_cfg("dataset=digits", "train.epochs=1")
    return cfg, pipeline.run(cfg).metrics


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pqsweep.cache" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("stage", CACHED)
@injects('a cache entry truncated, garbage or empty',
         'moved aside as `<name>.corrupt-<time>` with one warning, and computed again; the trial is the same',
         'the time to compute it again')
def test_a_broken_entry_is_set_aside_and_recomputed(cached_cfg, stage, breakage, caplog, monkeypatch):
    cfg, first = cached_cfg
    cache = store(cfg, stage)
    path = cache.path(stage_key(cfg, stage))
    broken = BREAKAGES[breakage](path.read_bytes())
    path.write_bytes(broken)

    built, build = [], data.digits
    monkeypatch.setattr(data, "digits", lambda c: built.append(c) or build(c))
    caplog.set_level(logging.WARNING)
    result = pipeline.run(cfg)

    (warning,) = warnings_of(caplog)  # one line, naming the file and what is wrong with it
    assert str(path) in warning and "\n" not in warning
    (aside,) = cache.dir.glob(f"{path.name}.corrupt-*")
    assert aside.read_bytes() == broken  # kept for a post-mortem, not destroyed
    assert cache.load(stage_key(cfg, stage)) is not None  # written again, readable
    assert result.baseline.cached == (stage != "baseline")
    assert len(built) == (stage == "data")  # only the broken stage was recomputed
    assert result.metrics["top1"] == first["top1"]  # the same trial as with the intact cache


def test_an_entry_without_the_fields_its_reader_takes_is_set_aside(tmp_path, caplog):
    cache = Store(tmp_path, "baseline", STAGES["baseline"].holds)
    cache.save("k", {"state_dict": {"w": torch.ones(2)}})  # written before `history` was stored, say
    caplog.set_level(logging.WARNING)
    assert cache.load("k") is None
    (warning,) = warnings_of(caplog)
    assert "lacks history" in warning
    assert not cache.path("k").exists() and len(list(tmp_path.glob("baseline-k.pt.corrupt-*"))) == 1


def test_an_entry_replaced_while_it_was_read_is_left_alone(tmp_path, caplog, monkeypatch):
    """load_splits looks up outside the lock: the good entry another process saved meanwhile must stay."""
    cache = Store(tmp_path, "data", STAGES["data"].holds)
    cache.path("k").write_bytes(b"")
    real_load = torch.load

    def replaced_while_reading(f, **kwargs):
        cache.save("k", {"good": torch.ones(1)})
        return real_load(f, **kwargs)

    monkeypatch.setattr(torch, "load", replaced_while_reading)
    caplog.set_level(logging.WARNING)
    assert cache.load("k") is None  # what this process read was broken...
    monkeypatch.setattr(torch, "load", real_load)
    assert torch.equal(real_load(cache.path("k"))["good"], torch.ones(1))  # ...but the new file is not moved
    assert warnings_of(caplog) == [] and list(tmp_path.glob("*.corrupt-*")) == []


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)], ids=["002", "022", "077"])
def test_entries_and_locks_get_the_umask_permissions(tmp_path, umask, mode):
    cache = Store(tmp_path, "baseline", STAGES["baseline"].holds)
    previous = os.umask(umask)
    try:
        cache.save("k", {"state_dict": {}, "history": []})
        with cache.lock("k"):
            pass
    finally:
        os.umask(previous)
    assert oct(cache.path("k").stat().st_mode & 0o777) == oct(mode)
    assert oct((tmp_path / ".baseline-k.lock").stat().st_mode & 0o777) == oct(mode)
