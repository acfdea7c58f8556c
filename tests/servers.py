"""Real servers for tests: a throwaway PostgreSQL cluster and an `mlflow server` backed by it, as a team runs them.

A test module imports the fixtures it uses (`from servers import mlflow_server, optuna_storage`; pytest puts tests/
on sys.path, as for nets.py) and gets:

- `postgres` (session): the SQLAlchemy URL of the database `optuna` (Optuna's tables made) on a cluster listening on
  127.0.0.1, on a free port, data in a temporary directory; the cluster runs as the `postgres` user when the tests run
  as root (PostgreSQL refuses root). Installed from the Debian packages if missing; skipped when that is impossible,
  unless PQSWEEP_REQUIRE_SERVERS=1 (set by .ci/run), when it fails instead.
- `optuna_storage` (function): a fresh database on that cluster for one test (Optuna's tables made, as
  scripts/team-stores.sh leaves them), so no test sees another's studies.
- `mlflow_server` (session): `http://127.0.0.1:<port>` of an `mlflow server` whose backend store is the database
  `mlflow` on the same cluster and whose artifacts it serves itself (--serve-artifacts) from a temporary directory.

Both stop what they started, also when a test or the start itself fails.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

USER = "pqsweep"  # the cluster's superuser; local trust authentication, on 127.0.0.1 only


def unavailable(reason: str):
    if os.environ.get("PQSWEEP_REQUIRE_SERVERS") == "1":
        pytest.fail(f"PQSWEEP_REQUIRE_SERVERS=1 but {reason}")
    pytest.skip(reason)


def pg_bin() -> Path | None:
    """The newest PostgreSQL's binaries, where Debian puts them (its /usr/bin has psql & co., but no pg_ctl)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    on_path = shutil.which("pg_ctl")
    return Path(found[-1]).parent if found else Path(on_path).parent if on_path else None


def install_postgres() -> Path:
    if pg_bin() is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            unavailable("PostgreSQL is not installed and apt-get cannot install it here (not root, or not Debian)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                unavailable(f"`{' '.join(command)}` failed: {done.stderr.strip()[-500:]}")
    return pg_bin()


def as_cluster_owner(command: list) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its commands as the `postgres` user the package creates."""
    return ["runuser", "-u", "postgres", "--", *map(str, command)] if os.geteuid() == 0 else [*map(str, command)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}")


def create_database(url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of the SQLAlchemy `url`; returns the new database's URL."""
    import psycopg

    server, _ = url.rsplit("/", 1)
    with psycopg.connect(f"{server.replace('+psycopg', '')}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def create_optuna_schema(url: str) -> str:
    """Optuna's tables in the database `url`, made before any worker opens it: workers that find a fresh database
    all create them at once, and all but one fail (duplicate key value violates ... "pg_type_typname_nsp_index")."""
    import optuna

    optuna.storages.RDBStorage(url).engine.dispose()
    return url


def drop_database(url: str) -> None:
    import psycopg

    server, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server.replace('+psycopg', '')}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def running_postgres() -> Iterator[str]:
    """A fresh cluster on 127.0.0.1:<free port>, durability off (a test's data dies with it); yields database optuna."""
    binaries = install_postgres()
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        unavailable("running as root and there is no `postgres` user to run PostgreSQL as")
    # Not under pytest's tmp_path: /tmp/pytest-of-root is root's alone and the postgres user must reach its data.
    home = Path(tempfile.mkdtemp(prefix="pqsweep-pg-"))
    data, port = home / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    try:
        run(as_cluster_owner([binaries / "initdb", "-D", data, "-U", USER, "--auth=trust", "--no-sync",
                              "--no-instructions"]))
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={home} " \
                  "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        run(as_cluster_owner([binaries / "pg_ctl", "start", "-w", "-t", "60", "-D", data, "-l", home / "log",
                              "-o", options]))
        yield create_optuna_schema(create_database(f"postgresql+psycopg://{USER}@127.0.0.1:{port}/postgres", "optuna"))
    finally:
        if (data / "postmaster.pid").exists():  # started, even if it then failed
            run(as_cluster_owner([binaries / "pg_ctl", "stop", "-D", data, "-m", "fast"]))
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def running_mlflow_server(backend_store: str, artifacts: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1:<free port> with one worker (CI has two cores); yields once /health answers."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store,
               "--serve-artifacts", "--artifacts-destination", str(artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(artifacts.parent / "mlflow-server.log", "w+")
    # its own session: stopping it stops the workers it forks, by this process group's id
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # it migrates a fresh database first: ~10 s here
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"mlflow server did not come up (exit {server.returncode}):\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@pytest.fixture
def optuna_storage(postgres, request) -> Iterator[str]:
    url = create_optuna_schema(
        create_database(postgres, f"optuna_{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]}"))
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[str]:
    artifacts = tmp_path_factory.mktemp("mlflow-server") / "artifacts"
    with running_mlflow_server(create_database(postgres, "mlflow"), artifacts) as uri:
        yield uri
