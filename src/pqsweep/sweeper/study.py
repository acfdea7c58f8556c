"""The Optuna study of a sweep as a durable object: where it is stored, what it is, and its trials of dead processes.

A study's identity is its name plus what it holds fixed (pqsweep.identity.fixed_settings: every setting that shapes
a trial's result, and its objectives and constraints) and its search space. Both are stored in the study's user
attributes when it is created, and a later command that differs in either is refused before anything runs, so trials
of two baselines never mix in one study. A study stored by an earlier pqsweep resumes: settings it stored that no
longer shape a result (facts, places) are not compared, a field added since counts as its default (a new field's
default keeps the old behaviour), and `migrated` reads values a rename changed. Trials left
RUNNING by a dead process are found by their recorded host and PID (any storage) or by Optuna's heartbeat (RDB
storages), and settled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from pqsweep import identity
from pqsweep.sweeper.space import StudyMismatch

log = logging.getLogger(__name__)

FIXED_ATTR, SPACE_ATTR, PARENT_ATTR, READY_ATTR = "pqsweep.fixed", "pqsweep.space", "mlflow_parent_run_id", "pqsweep.ready"
RUN_ATTR, HOST_ATTR, PID_ATTR, ERROR_ATTR = "mlflow_run_id", "pqsweep.host", "pqsweep.pid", "pqsweep.error"
TRACKING_ATTR = "pqsweep.tracking_uri"  # the MLflow store the study's runs are in (its password masked)
POINT_ATTR = "pqsweep.point"  # the grid point a queued trial was enqueued for
CREATOR_ATTR = "pqsweep.creator"  # owner() of the process creating the study, until it marks it ready
DISCARD_ATTR = "pqsweep.discarded"  # a trial that ran nothing (another worker took its point first)
RECOVERED_ATTR = "pqsweep.recovered"  # COMPLETE from its finished MLflow run: its process died before the tell
JOURNAL_SUFFIXES = (".journal", ".log")

# Functions that moved since a study could have stored them: a stored old path reads as the new one.
MOVED = {
    "pqsweep.quantization.fx.dynamic_int8": "pqsweep.quantization.dynamic.dynamic_int8",
    "pqsweep.quantization.fx.static_int8": "pqsweep.quantization.static.static_int8",
    "pqsweep.pruning.unstructured.random": "pqsweep.pruning.unstructured.random_weights",
}
STRUCTURED_UNSTRUCTURED = json.dumps("pqsweep.pruning.structured.structured_unstructured")


def migrated(stored: dict[str, str]) -> dict[str, str]:
    """A study's stored settings as today's pqsweep writes them: moved functions under their new paths, and
    structured_unstructured's filter step, a stage of its own since, named as its option file names it."""
    settings = {k: json.dumps(MOVED[json.loads(v)]) if v.startswith('"') and json.loads(v) in MOVED else v
                for k, v in stored.items()}
    if settings.get("pruning._target_") == STRUCTURED_UNSTRUCTURED and "pruning.structured_step" not in settings:
        settings["pruning.structured_step"] = json.dumps("pqsweep.pruning.structured.structured_step")
    return settings


def default_storage(tracking_uri: str) -> str:
    """A journal file beside the MLflow SQLite store (Optuna's journal takes several local writers); else ./."""
    match = re.fullmatch(r"sqlite:///(.+)", tracking_uri)
    folder = Path(match.group(1)).parent if match else Path(".")
    return str((folder / "optuna.journal").resolve())


def open_storage(url: str, heartbeat_interval: int | None, on_stale: Callable | None = None):
    """A journal file (a path ending in .journal or .log) or any RDB URL, the latter with Optuna's heartbeat."""
    if url.endswith(JOURNAL_SUFFIXES) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    interval = heartbeat_interval or None
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=interval, grace_period=interval and 4 * interval,
        heartbeat_stale_trial_callback=on_stale,
    )


def heartbeat_interval(storage) -> int | None:
    """The seconds between heartbeats of a storage that keeps them (RDB with an interval); None for the others."""
    return storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None


def open_study(name: str, storage, sampler, directions: list[str]) -> tuple[optuna.Study, bool]:
    """(the study, whether this call created it). Loaded first: a failed create would still write to a journal."""
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False
    except KeyError:
        pass
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, directions=directions)
        study.set_user_attr(CREATOR_ATTR, owner())  # at once: a worker that finds it unready knows whom to wait for
        return study, True
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def differences(stored: dict[str, str], current: dict[str, str]) -> list[str]:
    return sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))


def describe(stored: dict[str, str], current: dict[str, str], keys: list[str]) -> str:
    shown = [f"{k}={_show(stored.get(k))} (this command: {_show(current.get(k))})" for k in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return "; ".join(shown) + more


def _show(value: str | None) -> str:
    if value is None:
        return "unset"
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    if isinstance(decoded, dict) and "name" in decoded:  # a distribution: its choices or bounds
        attrs = decoded.get("attributes", {})
        return ",".join(map(str, attrs["choices"])) if "choices" in attrs else json.dumps(attrs)
    return str(decoded)


def check_identity(study: optuna.Study, cfg: DictConfig, fixed: dict[str, str], space: dict[str, str]) -> None:
    """Refuse a command whose fixed settings or search space differ from the study's (raises StudyMismatch)."""
    attrs = study.user_attrs
    if FIXED_ATTR not in attrs:
        return  # made outside pqsweep: adopted as it is
    settings = migrated(attrs[FIXED_ATTR])
    stored = {k: settings[k] for k in identity.compared(cfg, settings)}
    added = identity.defaults(cfg)  # fields added since the study was stored, at their default: as they were
    for what, before, now in (("holds", stored, fixed), ("searches", attrs.get(SPACE_ATTR, {}), space)):
        keys = [k for k in differences(before, now) if what == "searches" or k in before or now[k] != added.get(k)]
        if keys:
            raise StudyMismatch(
                f"study {study.study_name} {what} {describe(before, now, keys)}; resume it with the same "
                f"settings, or start a new study with study.name=<new name>"
            )


def wait_until_ready(study: optuna.Study, timeout: float = 30.0, unclaimed: float = 2.0) -> None:
    """A study another worker is creating right now: wait until its identity and parent run are stored. One whose
    creator is gone (killed or interrupted on this host before it was ready) is taken over at once; one nobody
    claimed within `unclaimed` seconds (a creator claims it right after creating it) too; a study made outside
    pqsweep never gets ready: after `timeout` the caller adopts it."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        attrs = study.user_attrs
        if attrs.get(READY_ATTR) or process_gone(attrs.get(CREATOR_ATTR, {})):
            return
        if CREATOR_ATTR not in attrs and time.monotonic() - started > unclaimed:
            return
        time.sleep(0.2)


def trial_params(trial: FrozenTrial) -> dict[str, Any]:
    """The point a trial is for: the one it was queued for, else what it was given (a study before POINT_ATTR
    queued its points as Optuna's fixed_params)."""
    return trial.user_attrs.get(POINT_ATTR) or trial.system_attrs.get("fixed_params") or trial.params


def real_trials(study: optuna.Study, states=None) -> list[FrozenTrial]:
    """The study's trials, less those discarded without running."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(DISCARD_ATTR)]


def params_of(study: optuna.Study, states) -> list[dict[str, Any]]:
    return [trial_params(t) for t in real_trials(study, states)]


# -- trials left RUNNING by a process that is gone -------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), so a reused PID is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner() -> dict[str, str]:
    pid = os.getpid()
    return {HOST_ATTR: socket.gethostname(), PID_ATTR: f"{pid}:{process_start(pid)}"}


def process_gone(attrs: dict) -> bool:
    """True when `attrs` (owner()'s) name a process on this host that no longer runs. Other hosts: heartbeat."""
    if attrs.get(HOST_ATTR) != socket.gethostname() or PID_ATTR not in attrs:
        return False
    pid, started = attrs[PID_ATTR].split(":", 1)
    return process_start(int(pid)) != started


def owner_is_gone(trial: FrozenTrial) -> bool:
    return process_gone(trial.user_attrs)


def live(study: optuna.Study, trial: FrozenTrial) -> optuna.trial.Trial:
    """A stored trial as a Trial whose attributes and constraints can be set. Optuna has no public way from a
    FrozenTrial to its storage id: `_trial_id` is the one private attribute this uses."""
    return optuna.trial.Trial(study, trial._trial_id)


def reap(study: optuna.Study, on_stale: Callable[[FrozenTrial, str], None],
         recorded: Callable[[FrozenTrial], list[float] | None] = lambda trial: None) -> tuple[int, int]:
    """Settle the trials whose process is gone (this host) or whose heartbeat stopped; returns (completed, failed).

    A trial whose run ended with its results before the process died (a kill between the two) is COMPLETE with
    `recorded(trial)`'s values (which sets its constraints), so it is not rerun; the others FAIL and
    `on_stale(trial, reason)` closes what they left open elsewhere (their MLflow run). Stale heartbeats are failed by
    Optuna itself."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    completed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RDB storages with a heartbeat; the storage's callback closes runs
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not owner_is_gone(trial):
            continue
        pid = trial.user_attrs[PID_ATTR].split(":")[0]
        reason = f"its process ({trial.user_attrs[HOST_ATTR]}, pid {pid}) is gone"
        try:
            values = recorded(trial)
            live(study, trial).set_user_attr(RECOVERED_ATTR if values is not None else ERROR_ATTR, reason)
            study.tell(trial.number, values=values, state=None if values is not None else TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            continue  # another worker reaped it first
        if values is not None:
            completed += 1
        else:
            on_stale(trial, reason)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return completed, len(before - after) - completed
