"""Ctrl-C and SIGTERM outside a sweep's trials, told once and honestly: one line, exit 130 (143).

Python raises KeyboardInterrupt wherever the main thread is when the signal comes, finalizers included: one that lands
in SQLAlchemy's weakref callbacks during garbage collection is printed there as "Exception ignored" and lost, and the
command goes on. So the handler also records the signal, the lost copy is not printed, and `check()` raises it again
where the command can stop (pqsweep.cli after the run, the sweeper after it made its study).
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

received: list[int] = []


def _on_signal(signum, frame) -> None:
    received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def check() -> None:
    """Raise the interruption a finalizer swallowed, if one did."""
    if received:
        raise KeyboardInterrupt(signal.Signals(received[-1]).name)


@contextmanager
def handled(prog: str) -> Iterator[None]:
    """Around a whole command: an interruption ends it with `<prog>: interrupted` and 128 + the signal."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook

    def quiet(unraisable) -> None:  # recorded in `received`; check() raises it again
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)

    sys.unraisablehook = quiet
    try:
        yield
        check()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(128 + (received[-1] if received else signal.SIGINT)) from None
    finally:
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler)
