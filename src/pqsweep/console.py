"""What pqsweep prints to a person: counts with their plural forms, durations, and progress bars that do not tear log
lines apart.

- `plural(3, "epoch")` -> "3 epochs", `plural(1, "epoch")` -> "1 epoch": every count printed goes through it.
- `duration(200)` -> "3.3 min".
- `bar(...)`: tqdm's bar, shown only on a terminal (tqdm's own `disable=None`: a log file, CI or a pipe gets no
  carriage-return frames), and while it is shown the log lines are written through tqdm (its
  `logging_redirect_tqdm`), above the bar, instead of into it. `TQDM_DISABLE=0` shows bars where there is no
  terminal too (benchmarks/timed_sweep.py counts the fine-tuning bars in a sweep's log).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable, Iterator

# nouns whose plural is not noun + "s"
IRREGULAR = {"entry": "entries", "pass": "passes", "batch": "batches", "study": "studies"}


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`count` and the noun in the form the count takes: 1 epoch, 0 epochs, 2 epochs."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {many or IRREGULAR.get(noun, noun + 's')}"


def duration(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 3.5 min, 1.2 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _console_handlers() -> bool:
    """Whether the root logger writes to a console stream (Hydra's job logging does): only then is a redirect due."""
    return any(type(h) is logging.StreamHandler for h in logging.root.handlers)


@contextlib.contextmanager
def bar(iterable: Iterable | None = None, **kwargs) -> Iterator:
    """A tqdm bar (kwargs as tqdm's) that is off where stderr is no terminal, and while it runs sends the root
    logger's console lines through tqdm.write, so a log line never lands in the middle of a bar's line."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    kwargs.setdefault("leave", False)
    if "TQDM_DISABLE" not in os.environ:  # tqdm reads TQDM_DISABLE=0 itself: bars forced on, into a log file too
        kwargs.setdefault("disable", None)  # tqdm's "off unless a TTY"
    with tqdm(iterable, **kwargs) as progress:
        redirect = logging_redirect_tqdm() if not progress.disable and _console_handlers() else contextlib.nullcontext()
        with redirect:
            yield progress


class OneJob(logging.Filter):
    """Hydra's launchers say "Launching 1 jobs locally" (an f-string in their code, no plural form): said right."""

    LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher._core")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if " 1 jobs" in message:
            record.msg, record.args = message.replace(" 1 jobs", " 1 job"), ()
        return True


def say_launches_right() -> None:
    """Install OneJob on Hydra's launchers' loggers (once)."""
    for name in OneJob.LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneJob) for f in logger.filters):
            logger.addFilter(OneJob())
