"""hydra-optuna-sweeper, with what a compression study needs on top of it.

- A value fixed on the command line removes that key from the sweep file's grid. The plugin builds the
  GridSampler's grid from the file's `params` *before* it drops parameters the command line fixes, so
  `pqsweep -m sweep=<grid> quantization=static_int8` would run every other grid point once per (ignored)
  quantization value.
- A grid's size comes from its grid: `n_trials` is ignored for the grid sampler, so widening a grid never
  silently drops points.
- Optuna's directions come from the objectives (`study.objectives`; each metric knows whether higher is better,
  `pqsweep.config.METRICS`), so a sweep file does not repeat them.
Sweep files choose it with `override /hydra/sweeper: pqsweep` (conf/hydra/sweeper/pqsweep.yaml).
"""

from __future__ import annotations

import functools
import logging

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _PluginSweeper

from pqsweep.config import directions
from pqsweep.preflight import command_line_keys

log = logging.getLogger(__name__)


def is_grid(sampler) -> bool:
    return isinstance(sampler, functools.partial) and sampler.func.__name__ == "GridSampler"


class OptunaSweeper(_PluginSweeper):
    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if impl.params:
            given = command_line_keys(arguments)
            impl.params = {k: v for k, v in impl.params.items() if k not in given}
        derived = directions(impl.config.study.objectives)
        if impl.direction is not None and list(impl._get_directions()) != derived:
            log.warning("hydra.sweeper.direction=%s ignored: the directions follow study.objectives %s: %s",
                        impl.direction, list(impl.config.study.objectives), derived)
        impl.direction = derived
        if is_grid(impl.sampler):
            impl.n_trials = 2**62  # the plugin takes min(n_trials, grid size): every point of the grid
        return super().sweep(arguments)
