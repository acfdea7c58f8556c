"""What runs beside the sweep loop: Optuna's heartbeat for the trials in flight, and the signals that end a sweep
cleanly."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from pqsweep.sweeper.study import heartbeat_interval


@contextmanager
def heartbeat(storage, trials: list) -> Iterator[None]:
    """Optuna's heartbeat for the trials in flight, on storages that keep one (RDB). Recording one takes the trial's
    storage id, which Optuna keeps private (`_trial_id`), as its own optimize loop does."""
    interval = heartbeat_interval(storage)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat_all() -> None:
        for trial in trials:
            storage.record_heartbeat(trial._trial_id)

    def beat() -> None:
        while not stop.wait(interval):
            beat_all()

    # The first beat before anything runs: Optuna fails only trials whose heartbeat went stale, so a trial whose
    # host died before its first beat would stay RUNNING, and the workers outliving it would wait for it forever.
    beat_all()

    thread = threading.Thread(target=beat, name="pqsweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def signals(loop) -> Iterator[None]:
    """Ctrl-C and SIGTERM (Slurm, Kubernetes, `timeout`) both end the sweep cleanly, as KeyboardInterrupt; the loop's
    `signal` keeps which one came."""

    def interrupt(signum, frame):
        loop.signal = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
