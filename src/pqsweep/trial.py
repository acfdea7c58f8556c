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

from pqsweep import estimate, identity, pipeline, records, tracking
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
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    with tracking.task_run(name, tags, run_id=cfg.launch.run_id) as active:
        run_id = active.info.run_id
        tracking.log_batch(MlflowClient(), run_id, params=records.params(cfg) | records.chosen_experiment())
        mlflow.log_text(config_yaml, "config.yaml")
        with tempfile.TemporaryDirectory(prefix="pqsweep-export-") as exported:
            result = pipeline.run(cfg, artifact_dir=exported)
            if any(Path(exported).iterdir()):
                mlflow.log_artifacts(exported, "model")
        records.log_inputs(cfg, result.data)
        mlflow.set_tags({f"{stage}_cached": str(hit).lower() for stage, hit in result.stages_cached.items()})
        mlflow.log_metrics(result.metrics)
        if result.model is not None:
            records.log_model(result.model, result.example, name)
    with store(cfg, "baseline").lock(result.baseline.key):  # parallel trials of one sweep log the baseline once
        # beside the trial: a study resumed from a store of before one experiment per study keeps its first one
        records.log_baseline(cfg, result.baseline.key, result.baseline_metrics, result.baseline.history, config_yaml,
                             active.info.experiment_id)
    m = result.metrics
    log.info("run %s: top1 %.2f%% (delta %+.2f), size %.4f MB (gzip %.4f), sparsity %.3f, latency p50 %.3f ms",
             run_id, m["top1"], m["top1_delta"], m["size_mb"], m["size_gzip_mb"], m["sparsity"], m["latency_ms_p50"])
    if not launched and tracking.PARENT_ENV not in os.environ:  # a sweep's own line says where its trials are
        log.info("in MLflow: %s", tracking.ui_link(active.info.experiment_id, run_id))
    # beside the metrics (never logged as metrics): what computing each stage took, for the sweep's estimate
    return result.metrics | {estimate.SECONDS + stage: s for stage, s in result.stages_seconds.items()}
