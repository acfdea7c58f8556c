"""hydra-optuna-sweeper, with one fix: a value fixed on the command line removes that key from the sweep file's grid.

The plugin builds the GridSampler's grid from the file's `params` *before* it drops parameters the command line
fixes, so `pqsweep -m sweep=<grid> quantization=static_int8` would run every other grid point once per (ignored)
quantization value. Sweep files name this class as `hydra.sweeper._target_`.
"""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _PluginSweeper


class OptunaSweeper(_PluginSweeper):
    def sweep(self, arguments: list[str]) -> None:
        fixed = {
            override.get_key_element()
            for override in OverridesParser.create().parse_overrides(arguments)
            if not override.is_sweep_override()
        }
        if self.sweeper.params:
            self.sweeper.params = {k: v for k, v in self.sweeper.params.items() if k not in fixed}
        return super().sweep(arguments)
