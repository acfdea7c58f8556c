"""What a command will use besides its config's values, checked before anything runs: the folders it writes (the
cache, Hydra's output folder, a SQLite store's and a journal's), the stores and servers it reaches (a tracking server
that answers, a database that listens), and the sweeper's own settings. Each problem is one line naming the key.

A folder is probed, not guessed from permission bits (root passes those): one that does not exist is made and removed
again, one that does has a temporary file made and removed in it, a file that exists is opened for writing. Nothing
is left behind. Nothing here imports torch, mlflow or optuna.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from pqsweep.stores import sqlite_file
from pqsweep.checks import Check

JOURNAL_SUFFIXES = (".journal", ".log")  # what pqsweep.sweeper.study.open_storage takes as a journal file
SWEEPER = "pqsweep.sweeper.OptunaSweeper"


def _writable_folder(folder: Path) -> str | None:
    """None where files can be made in `folder` (made first where it is missing); else what is wrong."""
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    else:
        return f"{folder} has no existing parent"
    if not parent.is_dir():
        return f"{parent} is not a folder"
    try:
        if missing:
            top = missing[-1]
            os.mkdir(top)
            os.rmdir(top)
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        return f"{error.strerror}: {error.filename or folder}"
    return None


def _writable_file(path: Path) -> str | None:
    if path.exists():
        try:
            with open(path, "r+b"):
                pass
        except OSError as error:
            return f"{path} cannot be written ({error.strerror})"
    return _writable_folder(path.parent) if path.parent.exists() else f"{path.parent} does not exist"


def _listening(url: str, timeout: float) -> str | None:
    """None where something accepts a connection at the URL's host and port."""
    parsed = urlparse(url)
    port = parsed.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(parsed.scheme.split("+")[0])
    if not parsed.hostname or port is None:
        return None  # a socket path or a driver's own default: left to the driver
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"nothing answers at {parsed.hostname}:{port} ({error.strerror or type(error).__name__})"
    return None


def _answering(uri: str, timeout: float) -> str | None:
    """None where the tracking server answers its health check within `timeout` seconds."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered, if not with 200 (a proxy's login page): MLflow itself will say more
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return f"it does not answer: {getattr(reason, 'strerror', None) or reason}, waited up to {timeout:g} s"


def tracking(cfg: DictConfig) -> list[Check]:
    from pqsweep.stores import absolute_uri

    uri = absolute_uri(cfg.tracking.uri)
    db = sqlite_file(uri)
    if db is not None:
        problem = f"{db.parent} does not exist (create it, or name a store in a folder that does)" \
            if not db.parent.is_dir() else _writable_file(db)
        return [Check("tracking.uri", cfg.tracking.uri, problem is None, f"a SQLite store pqsweep can write ({problem})")]
    if urlparse(uri).scheme in ("http", "https"):
        problem = _answering(uri, cfg.tracking.timeout)
        return [Check("tracking.uri", cfg.tracking.uri, problem is None,
                      f"a tracking server that answers ({problem}, tracking.timeout)")]
    return []


def storage(key: str, url: str | None, timeout: float) -> list[Check]:
    """A sweep's Optuna storage: a URL, or a journal file by its suffix (a bare path is neither: say which to write)."""
    if url is None:
        return []
    if "://" not in url:
        if not url.endswith(JOURNAL_SUFFIXES):
            return [Check(key, url, False, f"an Optuna storage URL (sqlite:///{url}) or a journal file ending in "
                                           f"{' or '.join(JOURNAL_SUFFIXES)}")]
        problem = _writable_file(Path(url).expanduser().resolve())
        return [Check(key, url, problem is None, f"a journal file pqsweep can write ({problem})")]
    db = sqlite_file(url)
    if db is not None:
        problem = _writable_file(db)
        return [Check(key, url, problem is None, f"a SQLite database pqsweep can write ({problem})")]
    problem = _listening(url, timeout)
    return [Check(key, url, problem is None, f"a database that listens ({problem})")]


def sweeper(cfg: DictConfig) -> list[Check]:
    """pqsweep's sweeper settings (hydra.sweeper.*), in a multirun that uses it."""
    node = OmegaConf.select(cfg, "hydra.sweeper")
    if node is None or node.get("_target_") != SWEEPER:
        return []
    rate, limit = node.max_failure_rate, node.get("max_failures")
    return [Check("hydra.sweeper.n_jobs", node.n_jobs, node.n_jobs >= 1, "an integer >= 1 (trials launched at once)"),
            Check("hydra.sweeper.n_trials", node.n_trials, node.n_trials >= 1, "an integer >= 1"),
            Check("hydra.sweeper.max_failure_rate", rate, 0.0 <= rate <= 1.0, "in [0, 1]"),
            Check("hydra.sweeper.max_failures", limit, limit is None or limit >= 1, "null or an integer >= 1"),
            Check("hydra.sweeper.heartbeat_interval", node.heartbeat_interval, node.heartbeat_interval >= 0,
                  "an integer >= 0 (0: off)"),
            # the key the user typed: study.storage, which the sweeper's storage follows, or the sweeper's own
            *storage("study.storage" if node.storage == cfg.study.storage else "hydra.sweeper.storage", node.storage,
                     cfg.tracking.timeout)]


def checks(cfg: DictConfig, multirun: bool) -> list[Check]:
    """Every check of the places and services a command uses; the first failing one is the command's refusal."""
    found = [Check("tracking.timeout", cfg.tracking.timeout, cfg.tracking.timeout > 0, "seconds > 0"),
             *tracking(cfg)]
    problem = _writable_folder(Path(cfg.cache.dir).expanduser().resolve())
    found.append(Check("cache.dir", cfg.cache.dir, problem is None, f"a folder pqsweep can write ({problem})"))
    output = OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    if output is not None:
        problem = _writable_folder(Path(output).expanduser().resolve())
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        found.append(Check(key, output, problem is None, f"a folder Hydra can write its log to ({problem})"))
    if multirun:
        found += sweeper(cfg)
    return found
