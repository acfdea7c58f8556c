"""The MLflow tracking store, created once: processes that first open a fresh SQLite store together lose runs.

MLflow's SqlAlchemyStore builds a new database in its constructor, unlocked: it creates the initial tables, then
runs the alembic migrations, whenever it finds a table missing. Two processes doing that at the same instant both
migrate (alembic CommandError, "duplicate column name: step"), or one finds the schema half-migrated ("out-of-date
database schema"), and the run that process was to log is lost. The parallel trials of a sweep do exactly that.
So each process opens the store under a file lock beside the database first; the first one creates it, the others
find it done. A store already at MLflow's schema takes no lock: parallel trials on it start without queueing.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
from contextlib import closing
from pathlib import Path


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////absolute/relative.db, so every process of a sweep writes one store."""
    match = re.fullmatch(r"sqlite:///(?!/|:memory:)(.+)", uri)  # an in-memory database has no file
    return f"sqlite:///{Path(match.group(1)).resolve()}" if match else uri


def sqlite_file(uri: str) -> Path | None:
    """The database file a `sqlite:///` URI names; None for other schemes and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").partition("?")[0]  # a query (?timeout=...) is not part of the file
    return None if path in ("", ":memory:") else Path(path).resolve()


def at_current_schema(db: Path) -> bool:
    """True when `db` holds MLflow's tables migrated to the revision this MLflow expects: nothing left to create."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision  # what the store's own check compares to
    except ImportError:  # a later MLflow moved it: take the lock every time, which is merely slower
        return False
    if not db.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as connection:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:  # no tables yet: another process is creating them, or nobody has
        return False
    return row is not None and row[0] == _get_latest_schema_revision()


_PREPARED: set[str] = set()  # SQLite stores this process found or made at MLflow's schema


def prepare_tracking_store(uri: str) -> None:
    """Create and migrate the SQLite store `uri` names unless it is there already; a no-op for other schemes.

    On a store at the current schema this is a read of its revision (~1 ms) and of MLflow's (~15 ms), no lock, and
    once per process: every trial of a sweep in one process would pay it again (28 ms a trial, profiled).
    """
    uri = absolute_uri(uri)
    db = sqlite_file(uri)
    if db is None or uri in _PREPARED:
        return
    if at_current_schema(db):
        _PREPARED.add(uri)
        return
    from mlflow import MlflowClient  # tracking imports this module; composing a config must not load mlflow

    db.parent.mkdir(parents=True, exist_ok=True)
    # Read-only suffices for flock, so a lock file a teammate created (0644 under umask 022) still opens.
    fd = os.open(db.with_name(f"{db.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Opening the store creates and migrates the schema when it is not there; one who waited finds it done.
        # MLflow keeps the opened store for the process, so the runs logged next reuse it.
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    finally:
        os.close(fd)  # closing releases the lock
    _PREPARED.add(uri)
