"""The `pqsweep` command: a Hydra app whose task is one compression run, logged to MLflow.

    pqsweep                                              # cnn on digits, fp32, no pruning
    pqsweep model=resnet18_cifar dataset=fake pruning=global_magnitude pruning.amount=0.9 quantization=static_int8
    pqsweep pruning=l1_filter quantization=static_int8 quantization.backend=pt2e export=onnx
    pqsweep pruning=iterative pruning.schedule=gradual quantization=qat_int8
    pqsweep -m pruning.amount=0,0.5,0.9 quantization=none,fp16,static_int8     # Hydra's basic grid
    pqsweep -m sweep=mnist_cnn_sparsity_x_precision                         # a study from sweeps/ (Optuna)
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from pathlib import Path

import hydra
import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import execution_whitelist
from omegaconf import DictConfig, OmegaConf

from pqsweep import tracking
from pqsweep.cache import BaselineCache, baseline_key
from pqsweep.config import TRUSTED_TARGETS, register
from pqsweep.pipeline import run
from pqsweep.preflight import preflight

log = logging.getLogger("pqsweep")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
register()


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_and_log(cfg: DictConfig) -> dict[str, float]:
    """One run as an MLflow run (a child of the sweep's parent run in a multirun)."""
    tracking.setup(cfg)
    key = baseline_key(cfg)
    tags = {"stage": "trial", "sweep": cfg.study.name, "baseline_hash": key}
    if _multirun():
        tags["trial_number"] = str(HydraConfig.get().job.num)
    name = f"{cfg.model.name}-{cfg.pruning.name}{cfg.pruning.amount:g}-{cfg.quantization.name}"
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    with tracking.task_run(name, tags) as active:
        run_id = active.info.run_id
        tracking.log_batch(mlflow.MlflowClient(), run_id, params=tracking.flat_params(cfg))
        mlflow.log_text(config_yaml, "config.yaml")
        with tempfile.TemporaryDirectory(prefix="pqsweep-export-") as exported:
            result = run(cfg, artifact_dir=exported)
            if any(Path(exported).iterdir()):
                mlflow.log_artifacts(exported, "model")
        mlflow.set_tag("baseline_cached", str(result.baseline.cached).lower())
        mlflow.log_metrics(result.metrics)
    with BaselineCache(cfg.cache.dir).lock(key):  # parallel trials of one sweep log the baseline once
        tracking.log_baseline(cfg, key, result.baseline_metrics, result.baseline.history, config_yaml)
    m = result.metrics
    log.info(
        "run %s: top1 %.2f%% (delta %+.2f), size %.4f MB (gzip %.4f), sparsity %.3f, latency p50 %.3f ms",
        run_id, m["top1"], m["top1_delta"], m["size_mb"], m["size_gzip_mb"], m["sparsity"], m["latency_ms_p50"],
    )
    return result.metrics


@hydra.main(config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> float | tuple[float, ...] | None:
    objectives = list(cfg.study.objectives)
    try:
        metrics = run_and_log(cfg)
    except Exception:
        if not _multirun():
            raise
        # Recorded as a FAILED MLflow run; NaN makes Optuna mark the trial failed and the sweep goes on.
        log.exception("trial failed; the sweep goes on")
        metrics = {k: math.nan for k in objectives}
    values = tuple(float(metrics[k]) for k in objectives)
    return values[0] if len(values) == 1 else values


def main() -> None:
    preflight(sys.argv[1:], CONF_DIR)
    with execution_whitelist(TRUSTED_TARGETS):  # Hydra's own instantiations: callbacks, sweeper, sampler
        app()


if __name__ == "__main__":
    main()
