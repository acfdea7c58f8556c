"""How long a sweep has left, counting the stages its later trials load from the cache instead of computing.

A sweep's first trial trains the baseline that every later trial loads, and a grid runs the points that share a
prune stage one after another (pqsweep.identity.is_late), so its trials' times differ by 10x and more: the mean of
the trials so far said ~32 min left after the first trial of a 3-min sweep. Here each trial reports what computing
each stage took (pqsweep.cache.Stages.seconds, returned beside its metrics under `seconds.<stage>`); the rest of the
time it accounts for is its own (quantize, measure, log, and the sweeper's bookkeeping before it), which every trial
pays. A trial still to run pays the mean own time, plus each stage it will compute: one no trial before it (ended,
or counted earlier in the estimate) has computed for the same values of the swept keys that shape the stage
(`shaped_by`). A stage's cost is the mean of the times it took.

    left = remaining([Ended(95.0, {"baseline": 80.0, "prune": 12.0}, {"pruning.amount": 0.5})],
                     to_come=[{"pruning.amount": 0.9}], shaped_by={"baseline": (), "prune": ("pruning.amount",)})
    # 3.0 (own) + 12.0 (a new prune stage) = 15.0 s; the baseline is loaded

A point not known in advance (a sampler's next trial: None in `to_come`) shares only the stages no swept key shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean
from typing import Any

SECONDS = "seconds."  # the prefix of a trial's returned stage times: {"seconds.baseline": 80.0, ...}


@dataclass
class Ended:
    seconds: float  # the wall time it accounts for: since the trial before it ended, as the sweeper saw it
    stages: dict[str, float] = field(default_factory=dict)  # the stages it computed, and what each took
    point: dict[str, Any] | None = None  # its values of the swept keys
    at: float = 0.0  # when it ended (time.monotonic())


def stage_seconds(returned: dict) -> dict[str, float]:
    """The stage times in a task's return value."""
    return {k[len(SECONDS):]: float(v) for k, v in returned.items() if k.startswith(SECONDS)}


def _group(point: dict[str, Any] | None, keys: tuple[str, ...]) -> Any:
    if not keys:
        return ()  # shaped by no swept key: one entry serves every point
    if point is None:
        return object()  # an unknown point: assumed to share no entry that a swept key shapes
    return tuple(str(point.get(k)) for k in keys)


def remaining(ended: list[Ended], to_come: list[dict[str, Any] | None],
              shaped_by: dict[str, tuple[str, ...]]) -> float | None:
    """Seconds the trials `to_come` will take, from the `ended` trials' times; None before any has ended."""
    if not ended:
        return None
    own = mean(max(0.0, e.seconds - sum(e.stages.values())) for e in ended)
    cost = {stage: mean(e.stages[stage] for e in ended if stage in e.stages)
            for stage in {s for e in ended for s in e.stages}}
    keys = {stage: tuple(shaped_by.get(stage, ())) for stage in cost}
    # a stage a trial loaded is in the cache as much as one it computed: every ended point's entries count
    held = {stage: {_group(e.point, keys[stage]) for e in ended} for stage in cost}
    total = 0.0
    for point in to_come:
        total += own
        for stage, seconds in cost.items():
            group = _group(point, keys[stage])
            if group not in held[stage]:
                total += seconds
                held[stage].add(group)
    return total
