"""What the MLflow UI opens on for a study: its runs table and chart, written as MLflow's own shared view, and the link.

MLflow 3.17 keeps a runs page's state in the browser; its Share button writes the same state to the experiment tag
`mlflow.sharedViewState.<key>`, and a link with `viewStateShareKey=<key>` opens it for anyone. What that state can
hold, read from 3.17's UI (experiment-page `ExperimentPageUIState`, and the hook that loads a shared view):

- the search facets (filter, sort, lifecycle) and, of the UI state, `selectedColumns`, `columnOrder`, `columnWidths`,
  `runsHiddenMode`, `compareRunCharts`, `compareRunSections` and `hideEmptyCharts`: written here;
- not `runsExpanded`, `runsPinned`, `runsHidden` or run colours (dropped on load, or kept in local storage only).
  So trials cannot be shown unfolded under their parent; instead the table is sorted by the first objective, and the
  UI nests child runs only when sorted by start time: every trial is a row of its own, and every chart holds them all;
- nothing that rounds a number: the table shows a metric as logged (latency to 9 digits). pqsweep logs no rounded
  second copy; `pqsweep-report` prints the rounded table;
- nothing that colours a scatter's points by a value: the front is marked by the trials' `pareto` tag, a column here
  (`true` on the front, `false` otherwise, as pqsweep-report writes it; written when the study ends); the chart's tooltip names each point's run.
"""

from __future__ import annotations

import json
import uuid

import mlflow
from mlflow.tracking import MlflowClient

from pqsweep.metrics import METRICS, VIEW

VIEW_KEY = "pqsweep"
# `true` on a trial of the study's Pareto front (Optuna's best trials), `false` otherwise: the values pqsweep-report
# writes, so the MLflow filter tags.pareto = "true" means one thing whoever wrote it
FRONT_TAG = "pareto"
SECTION = "pqsweep: objectives"
# px: what fits a 1600-wide window beside the pinned run name and the page's side bar
METRIC_WIDTH, PARAM_WIDTH, TAG_WIDTH = 118, 128, 96


def scatter_axes(objectives) -> tuple[str, str]:
    """(x, y) of the study's scatter: accuracy (the first objective to maximize) against size (the first other
    objective, else `size_mb`)."""
    objectives = list(objectives) or ["top1"]
    y = next((m for m in objectives if METRICS[m].direction == "maximize"), objectives[0])
    x = next((m for m in objectives if m != y), "size_mb" if y != "size_mb" else "top1")
    return x, y


def columns(objectives, swept=()) -> list[str]:
    """The table's columns in order: the objectives, the swept params beside them, the rest of the metrics' view, the
    front tag, the data set and the logged model."""
    rest = [m for m in VIEW if m not in objectives]
    return ([f"metrics.`{m}`" for m in objectives] + [f"params.`{p}`" for p in swept]
            + [f"metrics.`{m}`" for m in rest] + [f"tags.`{FRONT_TAG}`", "attributes.`Dataset`", "attributes.`Models`"])


def state(objectives, swept=()) -> dict:
    """The shared view's state (see the module docstring for what each part does and cannot do)."""
    objectives = list(objectives) or ["top1"]
    first = METRICS[objectives[0]]
    shown = columns(objectives, swept)
    widths = {c: METRIC_WIDTH if c.startswith("metrics.") else PARAM_WIDTH if c.startswith("params.") else TAG_WIDTH
              for c in shown if not c.startswith("attributes.")}
    x, y = scatter_axes(objectives)
    section = str(uuid.uuid5(uuid.NAMESPACE_URL, f"pqsweep/{SECTION}"))
    chart = {"uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"pqsweep/scatter/{x}/{y}")), "type": "SCATTER",
             "runsCountToCompare": 100, "metricSectionId": section, "deleted": False, "isGenerated": False,
             "displayName": f"{y} against {x}",
             "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}}
    return {"searchFilter": "", "orderByKey": f"metrics.`{first.name}`", "orderByAsc": first.direction == "minimize",
            "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": shown, "columnOrder": shown, "columnWidths": widths, "runsHiddenMode": "SHOW_ALL",
            "hideEmptyCharts": True, "compareRunCharts": [chart],
            "compareRunSections": [{"uuid": section, "name": SECTION, "display": True, "isReordered": False,
                                    "deleted": False, "isGenerated": False}]}


def share_view(experiment_id: str, objectives=(), swept: tuple[str, ...] = ()) -> None:
    """Write the study's view to its experiment (a sweep widens it with its swept keys)."""
    MlflowClient().set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}",
                                      json.dumps(state(objectives, swept)))


def mark_front(front: list[str], dominated: list[str]) -> None:
    """Tag the runs of the study's Pareto front `front` true and the others (`dominated`) false (rewritten at each
    study end: a resumed study's front moves). Workers ending one study together may write the same tag at once: a
    tracking server on PostgreSQL then refuses the second insert (UniqueViolation), and writing it again updates."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    for run_id, value in [(r, "true") for r in front] + [(r, "false") for r in dominated]:
        try:
            client.set_tag(run_id, FRONT_TAG, value)
        except MlflowException:
            client.set_tag(run_id, FRONT_TAG, value)


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look in the MLflow UI: the study's runs in its view, or one run. The model-training view is asked for
    in the link: MLflow 3.17 opens every experiment in its GenAI view (its switch is global, kept by the browser,
    and no longer reads the experiment's mlflow.experimentKind tag)."""
    kind = "workflowType=machine_learning"
    page = f"runs/{run_id}?{kind}" if run_id else f"runs?viewStateShareKey={VIEW_KEY}&{kind}"
    path = f"#/experiments/{experiment_id}/{page}"
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"run `mlflow ui --backend-store-uri {uri}` and open http://127.0.0.1:5000/{path}"
