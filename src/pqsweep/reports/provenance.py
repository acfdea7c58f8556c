"""What a sweep's trials ran on, read back from their runs: data set, scale, image counts, epochs, seeds, weights.

Every report opens with it (pqsweep.reports.report), so a number is never read without the data that made it:

    ran on: data mnist5k (train 4,050 / val 450 / test 500 images, 10 classes), scale cpu, epochs 20 baseline +
            4 fine-tune, seeds 0, weights trained here

It is read from what pqsweep.records logs on each trial: the params `dataset`, `scale`, `train.epochs`,
`train.finetune_epochs`, `train.seed`, `model.pretrained`, and the run's inputs (one per split, its profile holding
`num_rows` and `num_classes`). A value the runs did not log shows as "?"; several values are listed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from mlflow.entities import Run

from pqsweep.reports.sweeps import metric

# Data sets that are random tensors, not images of anything: accuracy on them is chance by construction.
RANDOM_DATA = {"fake": "random images (fake data): accuracy is chance"}
SPLITS = ("train", "val", "test")
SIGMAS = 3.0  # "at chance": within this many standard errors of the chance rate over the test images


@dataclass(frozen=True)
class RanOn:
    data: list[str]  # the data sets' names (param `dataset`)
    scale: list[str]  # cpu / paper (param `scale`)
    images: dict[str, int] = field(default_factory=dict)  # split -> images, from the runs' inputs
    classes: int | None = None
    epochs: list[str] = field(default_factory=list)
    finetune_epochs: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    pretrained: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The header line of a report."""
        data = "/".join(self.data) or "?"
        notes = [RANDOM_DATA[d] for d in self.data if d in RANDOM_DATA]
        counts = [f"{s} {self.images[s]:,}" for s in SPLITS if s in self.images]
        inside = ([" / ".join(counts) + " images"] if counts else []) + (
            [f"{self.classes} classes"] if self.classes else []) + notes
        # pretrained=False with no baseline epochs is a random network, the ImageNet stand-in's case
        untrained = self.epochs == ["0"]
        weights = {"True": "pretrained", "False": "random init, untrained" if untrained else "trained here"}
        return (f"ran on: data {data}{' (' + ', '.join(inside) + ')' if inside else ''}, scale {listed(self.scale)}, "
                f"epochs {listed(self.epochs)} baseline + {listed(self.finetune_epochs)} fine-tune, "
                f"seeds {listed(self.seeds)}, weights {listed([weights.get(p, p) for p in self.pretrained])}")


def listed(values: list[str]) -> str:
    return ", ".join(values) if values else "?"


def distinct(runs: list[Run], key: str) -> list[str]:
    """The values the runs logged for a param, numbers in numeric order."""
    found = {r.data.params[key] for r in runs if key in r.data.params}
    return sorted(found, key=lambda v: (0, float(v), v) if v.replace(".", "", 1).lstrip("-").isdigit() else (1, 0, v))


def images(runs: list[Run]) -> tuple[dict[str, int], int | None]:
    """(split -> image count, classes) from the first run that logged its inputs (every trial of a sweep shares its
    data stage, so one run says it)."""
    for run in runs:
        inputs = getattr(run, "inputs", None)
        counts, classes = {}, None
        for item in getattr(inputs, "dataset_inputs", None) or []:
            context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), None)
            try:
                profile = json.loads(item.dataset.profile or "{}")
            except ValueError:
                continue
            if context in SPLITS and "num_rows" in profile:
                counts[context] = int(profile["num_rows"])
                classes = profile.get("num_classes", classes)
        if counts:
            return counts, classes
    return {}, None


def ran_on(runs: list[Run]) -> RanOn:
    counts, classes = images(runs)
    if classes is None:
        logged = distinct(runs, "dataset.num_classes")
        classes = int(logged[0]) if len(logged) == 1 else None
    return RanOn(distinct(runs, "dataset") or distinct(runs, "dataset.name"), distinct(runs, "scale"), counts,
                 classes, distinct(runs, "train.epochs"), distinct(runs, "train.finetune_epochs"),
                 distinct(runs, "train.seed"), distinct(runs, "model.pretrained"))


def chance(metric: str, classes: int | None) -> float | None:
    """The accuracy (%) guessing gives: k / classes for top-k; None for a metric that is no top-k accuracy."""
    k = {"top1": 1, "top5": 5}.get(metric)
    return None if k is None or not classes else 100.0 * min(k, classes) / classes


def at_chance(values: list[float], metric: str, on: RanOn) -> bool:
    """Whether every value is indistinguishable from guessing: within SIGMAS standard errors of the chance rate over
    the test images (with 26 test images of 1000 classes, one top-5 hit, 3.85 %, still is)."""
    rate = chance(metric, on.classes)
    if rate is None or not values:
        return False
    n = on.images.get("test")
    p = rate / 100.0
    margin = 100.0 * SIGMAS * math.sqrt(p * (1 - p) / n) if n else 0.0
    return all(v <= rate + margin for v in values)


def front_at_chance(front: list, objectives, on: RanOn) -> str:
    """Why a front's hypervolume means nothing, where every one of its trials' accuracy is chance ("" otherwise): a
    volume of 0, or of noise, would read as a result. `front`: its rows (pqsweep.reports.table.Row)."""
    for o in objectives:
        values = [v for r in front if (v := metric(r.run, o.name)) is not None]
        if o.direction == "maximize" and at_chance(values, o.name, on):
            return (f"every front trial's {o.name} is chance ({chance(o.name, on.classes):.3g} % for {on.classes} "
                    f"classes, within {SIGMAS:g} standard errors over {on.images.get('test', '?')} test images), so "
                    "the front trades nothing")
    return ""
