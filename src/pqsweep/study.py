"""The Optuna study of a sweep as a durable object: where it is stored, what it is, which of its points are done.

A study's identity is its name plus what it holds fixed: the settings that shape a trial's result (model, data,
training, measurement, the objectives) and its search space. Both are stored in the study's user attributes when it
is created, and a later command that differs in either is refused before anything runs, so trials of two
baselines never mix in one study. Grid points are enqueued trials; a point is done when one of its trials is
COMPLETE, so a resumed grid runs only what is missing and a finished one runs nothing. Trials left RUNNING by a dead
process are found by their recorded host and PID (any storage) or by Optuna's heartbeat (RDB storages), failed, and
run again.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, distribution_to_json
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

# Config keys that do not shape a trial's result: where it is stored and cached, and bookkeeping the sweeper sets.
NOT_FIXED = ("tracking", "cache", "sensitivity", "study.name", "study.storage", "study.trial", "hydra")
FIXED_ATTR, SPACE_ATTR, PARENT_ATTR, READY_ATTR = "pqsweep.fixed", "pqsweep.space", "mlflow_parent_run_id", "pqsweep.ready"
RUN_ATTR, HOST_ATTR, PID_ATTR, ERROR_ATTR = "mlflow_run_id", "pqsweep.host", "pqsweep.pid", "pqsweep.error"
DISCARD_ATTR = "pqsweep.discarded"  # a trial that ran nothing (another worker took its point first)
RECOVERED_ATTR = "pqsweep.recovered"  # COMPLETE from its finished MLflow run: its process died before the tell
JOURNAL_SUFFIXES = (".journal", ".log")


class StudyMismatch(Exception):
    """The command asks for a study whose stored identity differs; the message is one line."""


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


def open_study(name: str, storage, sampler, directions: list[str]) -> tuple[optuna.Study, bool]:
    """(the study, whether this call created it). Loaded first: a failed create would still write to a journal."""
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False
    except KeyError:
        pass
    try:
        return optuna.create_study(storage=storage, study_name=name, sampler=sampler, directions=directions), True
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def fixed_settings(config: DictConfig, swept: Iterable[str]) -> dict[str, str]:
    """The resolved settings that shape every trial's result, minus the swept keys, as flat dot keys."""
    swept = tuple(swept)
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if prefix.startswith(NOT_FIXED) or any(prefix == k or prefix.startswith(k + ".") for k in swept):
            return
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = json.dumps(node)

    for key in config:
        if key != "hydra":
            walk(str(key), OmegaConf.to_container(config[key], resolve=True, enum_to_str=True)
                 if OmegaConf.is_config(config[key]) else config[key])
    return flat


def space_json(space: dict[str, BaseDistribution]) -> dict[str, str]:
    return {name: distribution_to_json(d) for name, d in space.items()}


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


def check_identity(study: optuna.Study, fixed: dict[str, str], space: dict[str, str]) -> None:
    """Refuse a command whose fixed settings or search space differ from the study's (raises StudyMismatch)."""
    attrs = study.user_attrs
    if FIXED_ATTR not in attrs:
        return  # made outside pqsweep: adopted as it is
    for what, stored, current in (("holds", attrs.get(FIXED_ATTR, {}), fixed),
                                  ("searches", attrs.get(SPACE_ATTR, {}), space)):
        keys = differences(stored, current)
        if keys:
            raise StudyMismatch(
                f"study {study.study_name} {what} {describe(stored, current, keys)}; resume it with the same "
                f"settings, or start a new study with study.name=<new name>"
            )


def wait_until_ready(study: optuna.Study, timeout: float = 30.0) -> None:
    """A study another worker is creating right now: wait until its identity and parent run are stored. A study
    made outside pqsweep never gets ready; after `timeout` the caller adopts it."""
    deadline = time.monotonic() + timeout
    while not study.user_attrs.get(READY_ATTR) and time.monotonic() < deadline:
        time.sleep(0.5)


def norm(value: Any) -> Any:
    """0 and 0.0 are one grid value."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def point_key(params: dict[str, Any], names: Iterable[str]) -> tuple:
    return tuple((name, norm(params.get(name))) for name in names)


def grid_points(choices: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(choices)
    return [dict(zip(names, values)) for values in itertools.product(*choices.values())]


def trial_params(trial: FrozenTrial) -> dict[str, Any]:
    return trial.system_attrs.get("fixed_params", trial.params)


def real_trials(study: optuna.Study, states=None) -> list[FrozenTrial]:
    """The study's trials, less those discarded without running."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(DISCARD_ATTR)]


def missing_points(study: optuna.Study, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points with no trial that is done, running or queued."""
    names = list(points[0]) if points else []
    taken = {point_key(trial_params(t), names)
             for t in real_trials(study, (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))}
    return [p for p in points if point_key(p, names) not in taken]


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


def owner_is_gone(trial: FrozenTrial) -> bool:
    """True when the trial was started on this host by a process that no longer runs. Other hosts: heartbeat."""
    if trial.user_attrs.get(HOST_ATTR) != socket.gethostname() or PID_ATTR not in trial.user_attrs:
        return False
    pid, started = trial.user_attrs[PID_ATTR].split(":", 1)
    return process_start(int(pid)) != started


def reap(study: optuna.Study, on_stale: Callable[[FrozenTrial, str], None],
         recorded: Callable[[FrozenTrial], list[float] | None] = lambda trial: None) -> tuple[int, int]:
    """Settle the trials whose process is gone (this host) or whose heartbeat stopped; returns (completed, failed).

    A trial whose run ended with its results before the process died (a kill between the two) is COMPLETE with
    `recorded(trial)`'s values, so it is not rerun; the others FAIL and `on_stale(trial, reason)` closes what they
    left open elsewhere (their MLflow run). Stale heartbeats are failed by Optuna itself."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    completed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RDB storages with a heartbeat; the storage's callback closes runs
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_is_gone(trial):
            values = recorded(trial)
            pid = trial.user_attrs[PID_ATTR].split(":")[0]
            reason = f"its process ({trial.user_attrs[HOST_ATTR]}, pid {pid}) is gone"
            try:
                if values is not None:
                    study._storage.set_trial_user_attr(trial._trial_id, RECOVERED_ATTR, reason)
                    study._storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, values)
                    completed += 1
                    continue
                study._storage.set_trial_user_attr(trial._trial_id, ERROR_ATTR, reason)
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker reaped it first
            on_stale(trial, reason)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return completed, len(before - after) - completed
