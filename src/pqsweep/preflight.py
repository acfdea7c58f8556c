"""Check the command line before Hydra runs anything: every value a run or sweep will use must compose and validate.

A bad value exits 1 with one line naming the key and the allowed values, before any data is loaded or any
trial starts, so a typo in the ninth grid point does not surface after eight trials have trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pqsweep.config import ConfigError, validate
from pqsweep.sweeper import command_line_keys


def expand(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """Split overrides into fixed ones and, per discrete sweep, its single-value alternatives.

    Continuous sweeps (interval) are left to the sweeper, which samples inside their bounds. Call it inside an
    initialized Hydra context: glob sweeps over a group (`model=glob(resnet*)`) need the config loader.
    """
    fixed, sweeps = [], []
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    for override in parser.parse_overrides(overrides):
        if override.is_hydra_override():
            continue
        if not override.is_sweep_override():
            fixed.append(override.input_line)
        elif override.is_discrete_sweep():
            prefix = override.get_key_element()
            sweeps.append([f"{prefix}={value}" for value in override.sweep_string_iterator()])
    return fixed, sweeps


def one_line(override: str, error: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages, reduced to the key, the value and what is allowed."""
    if isinstance(error, ConfigError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, option = error.missing_cfg_file.rsplit("/", 1)
        options = GlobalHydra.instance().config_loader().get_group_options(group)
        return f"{group}={option} is not an option; allowed: {', '.join(options)}"
    cause = error.__cause__ if isinstance(error, ConfigCompositionException) and error.__cause__ else error
    if isinstance(cause, OmegaConfBaseException):
        message = str(cause).splitlines()[0]
        key = getattr(cause, "full_key", None)
        return f"{key or override}: {message}"
    return f"{override}: {str(error).splitlines()[0]}"


def check_directions(cfg) -> None:
    """An Optuna sweep needs one direction per objective, or every trial's result is refused."""
    direction = OmegaConf.select(cfg, "hydra.sweeper.direction")
    if direction is None:
        return  # not an Optuna sweep
    count = len(direction) if OmegaConf.is_list(direction) else 1
    if count != len(cfg.study.objectives):
        raise ConfigError(
            f"hydra.sweeper.direction has {count} direction(s) for {len(cfg.study.objectives)} "
            f"study.objectives {list(cfg.study.objectives)}: give one direction per objective"
        )


def check(overrides: list[str], config_dir: Path) -> str | None:
    """Returns the one-line error of the first bad value, or None when every value composes and validates."""
    with initialize_config_dir(config_dir=str(config_dir)):
        try:
            fixed, sweeps = expand(overrides)
            cfg = compose("config", overrides=fixed, return_hydra_config=True)
            validate(cfg)
            check_directions(cfg)
        except Exception as error:  # noqa: BLE001 - every failure becomes one line
            return one_line(" ".join(overrides), error)
        # A sweep file's own grid (hydra.sweeper.params) is checked like a command-line sweep, except for the
        # keys the command line sets itself: those replace the file's grid entries.
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        given = command_line_keys(overrides, GlobalHydra.instance().config_loader())
        sweeps += expand([f"{k}={v}" for k, v in params.items() if k not in given])[1]
        for alternatives in sweeps:
            for override in alternatives:
                try:
                    validate(compose("config", overrides=fixed + [override]))
                except Exception as error:  # noqa: BLE001
                    return one_line(override, error)
    return None


def preflight(argv: list[str], config_dir: Path, prog: str = "pqsweep") -> None:
    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_dir or args.config_name:
        return  # Hydra answers these itself; a different primary config is the user's to check
    problem = check(args.overrides, config_dir)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(1)
