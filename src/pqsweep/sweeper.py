"""hydra-optuna-sweeper, with one fix: a value fixed on the command line removes that key from the sweep file's grid.

The plugin builds the GridSampler's grid from the file's `params` *before* it drops parameters the command line
fixes, so `pqsweep -m sweep=<grid> quantization=static_int8` would run every other grid point once per (ignored)
quantization value. Sweep files name this class as `hydra.sweeper._target_`.
"""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _PluginSweeper


def command_line_keys(arguments: list[str], config_loader=None) -> set[str]:
    """Keys the command line sets, fixed or swept: each replaces the sweep file's grid entry of the same key.

    (For a swept key the plugin already lets the command line win; for a fixed one it does not, hence this.)
    """
    parser = OverridesParser.create(config_loader=config_loader)
    return {override.get_key_element() for override in parser.parse_overrides(arguments)}


class OptunaSweeper(_PluginSweeper):
    def sweep(self, arguments: list[str]) -> None:
        if self.sweeper.params:
            given = command_line_keys(arguments)
            self.sweeper.params = {k: v for k, v in self.sweeper.params.items() if k not in given}
        return super().sweep(arguments)
