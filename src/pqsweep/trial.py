"""One trial, orchestrated: open its MLflow run, run the pipeline, log what the pipeline returned, and hand its
metrics back (to the sweeper, through the task's return value).

    from pqsweep.trial import run
    metrics = run(cfg)  # cfg composed as `pqsweep` composes it; {"top1": ..., "size_mb": ..., ...}

The run is the one the sweeper created for the trial (`launch.run_id`), else a new one, nested under the sweep's
parent run where Hydra's other sweepers made one. The baseline is logged as a run of its own, once per experiment.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pqsweep import early_stop, estimate, identity, pipeline, records, tracking, view
from pqsweep.cache import store

log = logging.getLogger(__name__)


def run(cfg: DictConfig, trial_number: str | None = None) -> dict[str, float]:
    """Run `cfg` as one MLflow trial run (params, config, exported model, inputs, metrics, the stages it loaded) and
    return its metrics. `trial_number`: Hydra's job number in a multirun of another sweeper."""
    launched = cfg.launch.run_id is not None
    if launched:  # the sweeper's run is in its study's experiment (a study begun before one experiment per study
        tracking.connect(cfg)  # keeps its first one): none of the configured name is made for it
    else:
        tracking.setup(cfg)
    tags = {"baseline_hash": identity.stage_key(cfg, "baseline"), "cache_dir": str(Path(cfg.cache.dir).absolute())}
    if not launched:  # else the sweeper created the run with its study's name and trial number
        tags |= tracking.trial_tags(cfg.study.name, trial_number)
    name = records.run_name(cfg)
    config_yaml = OmegaConf.to_yaml(masked(cfg), resolve=True)
    with tracking.task_run(name, tags, run_id=cfg.launch.run_id, system_metrics=cfg.tracking.system_metrics) as active:
        run_id = active.info.run_id
        tracking.log_batch(MlflowClient(), run_id, params=records.params(cfg) | records.chosen_experiment())
        mlflow.log_text(config_yaml, "config.yaml")
        with tempfile.TemporaryDirectory(prefix="pqsweep-export-") as exported:
            try:
                result = pipeline.run(cfg, artifact_dir=exported)
            except early_stop.Stopped as stopped:
                return record_stopped(stopped)
            if any(Path(exported).iterdir()):
                mlflow.log_artifacts(exported, "model")
        records.log_inputs(cfg, result.data)
        mlflow.set_tags({f"{stage}_cached": str(hit).lower() for stage, hit in result.stages_cached.items()} |
                        {"finetune_epochs_run": str(result.epochs_run)})
        mlflow.log_metrics(result.metrics)
        mlflow.set_tags(result.tags)  # what ran each runtime's latency, or why it could not (pqsweep.latency)
        if result.model is not None:
            records.log_model(result.model, result.example, name)
    with store(cfg, "baseline").lock(result.baseline.key):  # parallel trials of one sweep log the baseline once
        # beside the trial: a study resumed from a store of before one experiment per study keeps its first one
        records.log_baseline(cfg, result.baseline.key, result.baseline_metrics, result.baseline.history, config_yaml,
                             active.info.experiment_id, result.baseline_tags)
    m = result.metrics
    log.info("run %s: top1 %.2f%% (delta %+.2f), size %.4f MB (gzip %.4f), sparsity %.3f, latency p50 %.3f ms",
             run_id, m["top1"], m["top1_delta"], m["size_mb"], m["size_gzip_mb"], m["sparsity"], m["latency_ms_p50"])
    if not launched and tracking.PARENT_ENV not in os.environ:  # a sweep's own line says where its trials are
        log.info("in MLflow: %s", view.ui_link(active.info.experiment_id, run_id))
    # beside the metrics (never logged as metrics): what computing each stage took, for the sweep's estimate
    return result.metrics | {estimate.SECONDS + stage: s for stage, s in result.stages_seconds.items()}


def masked(cfg: DictConfig) -> DictConfig:
    """The config as logged: a storage URL's password masked (launch.storage, set for study.early_stop)."""
    if cfg.launch.storage is None:
        return cfg
    shown = cfg.copy()
    shown.launch.storage = tracking.masked(cfg.launch.storage)
    return shown


def record_stopped(stopped: early_stop.Stopped) -> dict:
    """A trial study.early_stop stopped: its run KILLED (not FINISHED: its accuracy is not a result) with why, the
    validation curve it had and the cost it was priced at; the sweeper marks it PRUNED in Optuna."""
    for epoch, top1 in enumerate(stopped.curve, 1):
        mlflow.log_metric("val_top1", top1, step=epoch)
    mlflow.log_metrics(stopped.costs)
    mlflow.set_tags({"early_stopped": "true", "early_stop_reason": str(stopped)[:5000],
                     "early_stop_epochs_saved": str(stopped.epochs_saved),
                     "finetune_epochs_run": str(stopped.epochs_run)})
    mlflow.end_run("KILLED")
    log.info("stopped early after %d fine-tune epoch%s: %s", stopped.epochs_run, "" if stopped.epochs_run == 1
             else "s", stopped)
    return {"stopped": str(stopped), "epochs_run": stopped.epochs_run, "epochs_saved": stopped.epochs_saved}
