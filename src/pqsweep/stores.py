"""The MLflow SQLite store, created whole or not at all, once, whoever else opens it.

MLflow's SqlAlchemyStore builds a new database in place, in its constructor, unlocked: it creates the initial tables,
then runs the alembic migrations. Two processes doing that at once both migrate ("duplicate column name: step"), and
a process killed or interrupted half-way leaves a store every later run refuses ("table datasets already exists").
So pqsweep builds a fresh store in a temporary file beside the database and links it into place only when it is
complete (`os.link` fails where the name exists, so a store another client made meanwhile is never overwritten): a
kill at any moment leaves either no store or a working one. Under a file lock beside the database, pqsweep processes
create it once; a store another MLflow client (the UI, a notebook) is creating in place is waited for; a half-made
one that stopped changing and holds no run is moved aside (`<name>.broken-<UTC time>`, one warning) and made anew.
A store already at MLflow's schema takes no lock: parallel trials on it start without queueing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import sqlite3
import time
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)
WAIT = 60.0  # s a store another client is creating may take to reach MLflow's schema
STALE = 5.0  # s without a change after which a half-made store is taken as abandoned


class StoreError(RuntimeError):
    """A SQLite store pqsweep cannot use as it is; the message is one line that says what to do."""


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


def latest_revision() -> str | None:
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision  # what the store's own check compares to
    except ImportError:  # a later MLflow moved it: every store reads as not at the schema, which is merely slower
        return None
    return _get_latest_schema_revision()


UNREAD = -1  # `held` of a store that could not be read: never taken for an empty one


def revision(db: Path) -> tuple[str | None, int]:
    """(the store's alembic revision, how many runs and experiments it holds beyond the Default one); (None, 0) for a
    file without MLflow's tables yet; (None, UNREAD) for one that cannot be read now (locked by a writer, or left
    with a journal to roll back that a read-only connection cannot), which nothing may take for empty."""
    for mode in ("ro", "rw"):  # read-write only to let SQLite roll back a killed writer's journal; it selects only
        try:
            with closing(sqlite3.connect(f"{db.as_uri()}?mode={mode}", uri=True, timeout=1.0)) as connection:
                tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                row = connection.execute("SELECT version_num FROM alembic_version").fetchone() \
                    if "alembic_version" in tables else None
                held = sum(connection.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] - (t == "experiments")
                           for t in ("runs", "experiments") if t in tables)
            return (row[0] if row else None), held
        except sqlite3.DatabaseError as error:
            if "file is not a database" in str(error):  # garbage, or a file being made: nothing held
                return None, 0
    return None, UNREAD


def at_current_schema(db: Path) -> bool:
    """True when `db` holds MLflow's tables migrated to the revision this MLflow expects: nothing left to create."""
    found = revision(db)[0] if db.is_file() else None
    return found is not None and found == latest_revision()


_PREPARED: set[str] = set()  # SQLite stores this process found or made at MLflow's schema


@contextmanager
def _locked(db: Path) -> Iterator[None]:
    # Read-only suffices for flock, so a lock file a teammate created (0644 under umask 022) still opens.
    fd = os.open(db.with_name(f"{db.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _create(db: Path) -> bool:
    """Build a whole store in a temporary file and link it in as `db`; False where `db` appeared meanwhile."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    building = db.with_name(f".{db.name}.creating-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        store = SqlAlchemyStore(f"sqlite:///{building}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
        store.engine.dispose()
        os.link(building, db)  # atomic, and refuses to replace a store another client made meanwhile
        return True
    except FileExistsError:
        return False
    finally:
        building.unlink(missing_ok=True)  # a kill leaves it: the next creator, holding the lock, removes it


def _set_aside(db: Path, why: str) -> None:
    aside = db.with_name(f"{db.name}.broken-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}")
    os.replace(db, aside)
    log.warning("MLflow store %s was %s and held no run: moved to %s, making it anew", db, why, aside.name)


def prepare_tracking_store(uri: str) -> None:
    """Make the SQLite store `uri` names whole unless it is there already; a no-op for other schemes.

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
    db.parent.mkdir(parents=True, exist_ok=True)
    if latest_revision() is None:  # a later MLflow moved its revision: let it open the store as it does itself
        from mlflow import MlflowClient

        with _locked(db):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        _PREPARED.add(uri)
        return
    with _locked(db):
        for leftover in db.parent.glob(f".{db.name}.creating-*"):  # of a creator that was killed (we hold the lock)
            leftover.unlink(missing_ok=True)
        deadline, seen, since = time.monotonic() + WAIT, None, time.monotonic()
        while not at_current_schema(db):
            if not db.exists():
                _create(db)
                continue
            state = (revision(db), db.stat().st_size, db.stat().st_mtime_ns)
            if state != seen:  # another client is still making it
                seen, since = state, time.monotonic()
            elif time.monotonic() - since > STALE or time.monotonic() > deadline:
                (found, held), latest = state[0], latest_revision()
                if held == UNREAD:
                    raise StoreError(f"tracking.uri={uri}: the store cannot be read (locked, or left mid-write); "
                                     "nothing was changed: run again once no other process writes it")
                if held:
                    raise StoreError(f"tracking.uri={uri}: the store is at MLflow schema {found}, not {latest}, and "
                                     f"holds runs; back it up, then run `mlflow db upgrade {uri}`")
                _set_aside(db, f"left half-made (schema {found})")
                continue
            time.sleep(0.2)
    _PREPARED.add(uri)
