"""The `pqsweep` command: a Hydra app whose task is one compression run, logged to MLflow.

    pqsweep                                              # cnn on digits, fp32, no pruning
    pqsweep model=resnet18_cifar dataset=fake pruning=global_magnitude pruning.amount=0.9 quantization=static_int8
    pqsweep pruning=l1_filter quantization=static_int8 quantization.backend=pt2e export=onnx
    pqsweep pruning=iterative pruning.schedule=gradual quantization=qat_int8
    pqsweep -m pruning.amount=0,0.5,0.9 quantization=none,fp16,static_int8     # Hydra's basic grid
    pqsweep -m sweep=mnist_cnn_sparsity_x_precision                         # a study from sweeps/ (Optuna)

Composition, the pre-run check, `--help` and `--cfg` import no torch or mlflow: those load when a run starts.
"""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import execution_whitelist
from omegaconf import DictConfig

from pqsweep import helptext, interrupts
from pqsweep.preflight import CONFIG_MODULE, preflight
from pqsweep.schema import register
from pqsweep.checks import TRUSTED_TARGETS, ConfigError

log = logging.getLogger("pqsweep")
register()


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_and_log(cfg: DictConfig) -> dict[str, float]:
    """One run as an MLflow run (a child of the sweep's parent run in a multirun)."""
    from pqsweep import trial

    number = str(HydraConfig.get().job.num) if _multirun() and cfg.launch.trial is None else None
    return trial.run(cfg, trial_number=number)


def fail(error: Exception) -> NoReturn:
    """A single run's error as one line on the console and exit 1; its traceback goes to the run's log file (and,
    by pqsweep.tracking.task_run, to the FAILED MLflow run as error.txt), whose path the line gives."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed", None, sys.exc_info())
    for handler in files:
        handler.handle(record)
    what = one_line(error)
    where = f"the traceback is in {files[0].baseFilename}" if files else "rerun with HYDRA_FULL_ERROR=1 for the traceback"
    print(f"pqsweep: error: {what}; {where} and the MLflow run's error.txt", file=sys.stderr)
    raise SystemExit(1)


def one_line(error: Exception) -> str:
    what = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return what if isinstance(error, ConfigError) else f"{type(error).__name__}: {what}"


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def app(cfg: DictConfig) -> dict[str, float | str]:
    """The task: a trial's metrics, which the sweeper reads its objectives and constraints from; in a sweep, a trial
    that raised returns {"error": its first line} (its MLflow run is FAILED with the traceback) and the sweep goes
    on."""
    try:
        return run_and_log(cfg)
    except Exception as error:
        if not _multirun():
            fail(error)
        log.exception("trial failed; the sweep goes on")
        return {"error": one_line(error)[:500]}


def main() -> None:
    if helptext.asked(sys.argv[1:]):
        print(helptext.text("pqsweep"), end="")
        return
    preflight(sys.argv[1:])
    with interrupts.handled("pqsweep"), execution_whitelist(TRUSTED_TARGETS):  # Hydra's own instantiations too
        app()


if __name__ == "__main__":
    main()
