"""pqsweep's sweeper as Hydra sees it: the plugin class and its config, nothing more (Hydra imports this module when it
discovers plugins, on every start, so it imports no Optuna and no MLflow).

It keeps the Optuna plugin's config (`hydra.sweeper.*`: sampler, storage, study_name, n_trials, n_jobs, params) and
adds its own keys; a sweep runs in pqsweep.sweeper.loop:

- pqsweep.sweeper.space: what is searched (grid points, narrowing by the command line, conditional keys), pure;
- pqsweep.sweeper.study and .ledger: the study as stored (identity, resume, dead trials) and its records in Optuna
  and MLflow, written once;
- pqsweep.sweeper.loop: ask -> start -> launch -> tell, with the failure budget, signals and the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf


@dataclass
class SweeperConf(OptunaSweeperConf):
    """The plugin's config plus pqsweep's keys (conf/hydra/sweeper/pqsweep.yaml fills them)."""

    _target_: str = "pqsweep.sweeper.OptunaSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "grid"}])
    max_failures: Optional[int] = None  # stop after this many failed trials in one run (null: never)
    fail_on_failed_trials: bool = True  # exit 1 when a trial failed; false: exit 0 as the plugin does
    heartbeat_interval: int = 30  # seconds between heartbeats of running trials on RDB storages (0: off)


ConfigStore.instance().store(group="hydra/sweeper", name="pqsweep_schema", node=SweeperConf, provider="pqsweep")


class OptunaSweeper(Sweeper):
    """Holds the sweeper's settings and Hydra's context; `sweep` hands them to the loop."""

    def __init__(self, sampler: Any, direction: Any, storage: str | None, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, custom_search_space: str | None, params: Any,
                 max_failures: int | None = None, fail_on_failed_trials: bool = True,
                 heartbeat_interval: int = 30) -> None:
        self.custom_search_space = custom_search_space  # refused in one line when the sweep starts
        self.sampler, self.direction, self.storage, self.study_name = sampler, direction, storage, study_name
        self.n_trials, self.n_jobs, self.max_failure_rate, self.params = n_trials, n_jobs, max_failure_rate, params
        self.max_failures, self.fail_on_failed_trials = max_failures, fail_on_failed_trials
        self.heartbeat_interval = heartbeat_interval

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        from pqsweep.sweeper.loop import sweep

        sweep(self, arguments)
