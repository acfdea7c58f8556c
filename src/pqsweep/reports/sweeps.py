"""Sweeps as MLflow holds them: a parent run (`tags.stage = 'sweep'`), its trial runs, and their baseline.

A pqsweep study keeps one parent run for all the processes that worked on it (a resumed study reopens its parent),
so the trials of every resumed process are its children. Hydra's basic sweeper makes a new parent for each multirun:
a name then picks the newest, and `--run` any other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

# Params that say where or how a trial ran, never what it is: they are no swept key even when they differ.
BOOKKEEPING = ("tracking.", "cache.", "study.", "hydra.", "sensitivity.", "export.")


@dataclass
class Sweep:
    name: str
    parent: Run
    trials: list[Run]
    baseline: Run | None
    others: list[str] = field(default_factory=list)  # older parent runs of the same name (basic sweeper reruns)

    @property
    def objectives(self) -> list[str]:
        text = self.parent.data.params.get("objectives")
        return [name for name in text.split(",") if name] if text else []

    @functools.cached_property
    def swept(self) -> list[str]:
        """The keys the sweep varied: its search space as the parent run logged it, and any param whose value differs
        between its trials (a command-line grid of Hydra's basic sweeper logs no space). Computed once: the report
        asks for it per row."""
        params = self.parent.data.params
        keys = [k.split(".", 1)[1] for k in params if k.startswith(("space.", "sweeper."))]
        logged = {key for run in self.trials for key in run.data.params}
        # a key varies when its trials hold more than one value for it, a trial without it counting as None
        varies = {key for key in logged if len({run.data.params.get(key) for run in self.trials}) > 1}
        for key in sorted(varies - set(keys)):
            group = key.split(".", 1)[0]
            # A swept group's option name says it all: its other keys (_target_, backend, ...) differ with it.
            if not key.startswith(BOOKKEEPING) and (key == group or group not in varies):
                keys.append(key)
        return list(dict.fromkeys(keys))


def experiment_ids(client: MlflowClient, experiment: str | None) -> list[str]:
    """The experiment named `experiment`; None: every one in the store (each study keeps its own, named after it)."""
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments(max_results=50000)]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"pqsweep-report: no experiment {experiment!r} at {mlflow.get_tracking_uri()}")
    return [found.experiment_id]


def parents(client: MlflowClient, experiment: str | None, name: str | None = None) -> list[Run]:
    """Parent runs, newest first; of the sweep `name` only, when given."""
    query = "tags.stage = 'sweep'" + (f" and tags.sweep = '{name}'" if name else "")
    return client.search_runs(experiment_ids(client, experiment), query, order_by=["attributes.start_time DESC"],
                              max_results=50000)


def load(client: MlflowClient, experiment: str | None, name: str | None = None, run_id: str | None = None) -> Sweep:
    """The sweep called `name` (its newest parent run) or the one whose parent run is `run_id`."""
    if run_id is not None:
        try:
            parent = client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise SystemExit(f"pqsweep-report: --run {run_id}: no such run at {mlflow.get_tracking_uri()}") from None
        if parent.data.tags.get("stage") != "sweep":
            raise SystemExit(f"pqsweep-report: --run {run_id} is no sweep's parent run (its stage tag is "
                             f"{parent.data.tags.get('stage')!r}); `pqsweep-report --list` shows the sweeps")
        found, others = parent, []
    else:
        runs = parents(client, experiment, name)
        found = [] if runs or name is None else variations(client, experiment, name)
        if len(found) == 1:  # only a variation of the sweep file ran here: it is the one meant
            runs = parents(client, experiment, found[0])
        elif found:
            raise SystemExit(f"pqsweep-report: no sweep {name!r} of the file's own settings at "
                             f"{mlflow.get_tracking_uri()}; its variations: {', '.join(found)} (pqsweep-report <name>)")
        if not runs:
            known = sorted({r.data.tags.get("sweep", "?") for r in parents(client, experiment)})
            where = f"in experiment {experiment!r} " if experiment else ""
            raise SystemExit(f"pqsweep-report: no sweep {name!r} {where}at {mlflow.get_tracking_uri()}; sweeps there: "
                             f"{', '.join(known) or 'none'}")
        found, others = runs[0], [r.info.run_id for r in runs[1:]]
    trials = client.search_runs([found.info.experiment_id], f"tags.mlflow.parentRunId = '{found.info.run_id}'",
                                max_results=50000)
    return Sweep(found.data.tags.get("sweep", name or found.info.run_id), found, trials,
                 baseline_of(client, found.info.experiment_id, trials), others)


def variations(client: MlflowClient, experiment: str | None, name: str) -> list[str]:
    """The studies run from sweep file `name` with other settings (pqsweep.sweeper.variation: `name@...`)."""
    base = name.split("@", 1)[0]
    # LIKE's _ matches any one character: the prefix is checked again here
    runs = client.search_runs(experiment_ids(client, experiment), f"tags.stage = 'sweep' and tags.sweep LIKE "
                              f"'{base}@%'", max_results=50000)
    return sorted({r.data.tags["sweep"] for r in runs if r.data.tags["sweep"].startswith(base + "@")} - {name})


def baseline_of(client: MlflowClient, experiment: str, trials: list[Run]) -> Run | None:
    """The baseline run the trials share; None when they have none or several."""
    hashes = {r.data.tags.get("baseline_hash") for r in trials} - {None}
    if len(hashes) != 1:
        return None
    found = client.search_runs([experiment], f"tags.stage = 'baseline' and tags.baseline_hash = '{hashes.pop()}'",
                               max_results=1)
    return found[0] if found else None


def metric(run: Run, name: str) -> float | None:
    """A run's metric, None when it did not log it or logged NaN."""
    value = run.data.metrics.get(name)
    return None if value is None or math.isnan(value) else float(value)


def listing(client: MlflowClient, experiment: str | None) -> list[list[str]]:
    """One row per parent run: the sweep's name, its run, status, trials by status, sampler, start."""
    import datetime

    rows = []
    for parent in parents(client, experiment):
        trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                    max_results=50000)
        statuses = [r.info.status for r in trials]
        start = datetime.datetime.fromtimestamp(parent.info.start_time / 1000, datetime.timezone.utc)
        rows.append([parent.data.tags.get("sweep", "?"), parent.info.run_id, parent.info.status,
                     str(statuses.count("FINISHED")), str(len(statuses) - statuses.count("FINISHED")),
                     parent.data.params.get("sampler", parent.data.params.get("sweeper", "?")),
                     start.strftime("%Y-%m-%d %H:%M")])
    return rows
