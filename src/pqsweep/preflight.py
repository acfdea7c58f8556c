"""Check the command line before Hydra runs anything: every value a run or sweep will use must compose and validate.

A bad value exits 1 with one line naming the key and the allowed values, before any data is loaded or any trial
starts, so a typo in the ninth grid point does not surface after eight trials have trained. It composes with the
same search path the app will use (the packaged configs, `--config-dir`, `hydra.searchpath`), so a user's own
options are checked like the built-in ones. Nothing here imports torch or mlflow (validate asks torch about the GPUs
only for device=cuda, and for its hub folder only for model.pretrained=true).
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path, get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from pqsweep import environment
from pqsweep.schema import OPTION_GROUPS, PROBE_LAYER, per_layer_field, register
from pqsweep.checks import ConfigError, refuse_first
from pqsweep.validate import validate

CONFIG_MODULE = "pqsweep.conf"  # the packaged configs: conf/ (and sweeps/ as its `sweep` group)


def command_line_keys(arguments: list[str], config_loader=None) -> set[str]:
    """Keys the command line sets, fixed or swept: each replaces the sweep file's grid entry of the same key."""
    parser = OverridesParser.create(config_loader=config_loader)
    return {override.get_key_element() for override in parser.parse_overrides(arguments)}


def expand(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """Split overrides into fixed ones and, per discrete sweep, its single-value alternatives.

    Continuous sweeps (interval) are left to the sweeper, which samples inside their bounds. Call it inside an
    initialized Hydra context: glob sweeps over a group (`model=glob(resnet*)`) need the config loader. Of the
    `hydra.*` overrides only the search path and Hydra's own group choices (`hydra/sweeper/sampler=tpe`) shape what
    composes, so only they are kept: an unknown sampler or launcher is refused here too.
    """
    fixed, sweeps = [], []
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    for override in parser.parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_hydra_override() and key != "hydra.searchpath" and "/" not in key:
            continue
        if not override.is_sweep_override():
            fixed.append(override.input_line)
        elif override.is_discrete_sweep():
            prefix = override.get_key_element()
            sweeps.append([f"{prefix}={value}" for value in override.sweep_string_iterator()])
    return fixed, sweeps


def options_having(hydra: Hydra, config_name: str, group: str, name: str) -> list[str]:
    """The options of `group` whose schema has the key `name` (each option composed alone)."""
    loader = GlobalHydra.instance().config_loader()
    found = []
    for option in loader.get_group_options(group, config_name=config_name):
        try:
            node = compose(hydra, config_name, [f"{group}={option}"])[group]
        except Exception:  # noqa: BLE001 - an option that does not compose alone has nothing to offer here
            continue
        if name in node:
            found.append(option)
    return found


def one_line(override: str, error: Exception, config_name: str = "config", search: list[str] = (),
             hydra: Hydra | None = None) -> str:
    """Hydra's and OmegaConf's multi-line messages, reduced to the key, the value and what is allowed.

    `search` holds the command line's `hydra.searchpath` overrides: the allowed options include the user's own.
    """
    if isinstance(error, ConfigError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, option = error.missing_cfg_file.rsplit("/", 1)
        loader = GlobalHydra.instance().config_loader()
        options = loader.get_group_options(group, config_name=config_name, overrides=list(search))
        return f"{group}={option} is not an option; allowed: {', '.join(options)}"
    cause = error.__cause__ if isinstance(error, ConfigCompositionException) and error.__cause__ else error
    key = getattr(cause, "full_key", None) or ""
    group, _, name = key.partition(".")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and group in OPTION_GROUPS and name and "." not in name and hydra:
        value = re.search(rf"(?:^|\s){re.escape(key)}=(\S+)", override)
        having = options_having(hydra, config_name, group, name)
        if value and having:
            return (f"{key}={value.group(1)} is not allowed: must be set with a {group} option that has it "
                    f"({group}={', '.join(having)})")
    if isinstance(cause, OmegaConfBaseException):
        message = str(cause).splitlines()[0]
        key = getattr(cause, "full_key", None)
        return f"{key or override}: {message}"
    return f"{override}: {str(error).splitlines()[0]}"


@contextmanager
def hydra_context(config_dir: str | None = None, config_module: str = CONFIG_MODULE) -> Iterator[Hydra]:
    """Hydra initialised as `@hydra.main` initialises it: the packaged configs, `--config-dir` in front."""
    search_path = create_automatic_config_search_path(None, None, f"pkg://{config_module}")
    if config_dir is not None:
        search_path.prepend("command-line", f"file://{os.path.abspath(config_dir)}")
    GlobalHydra.instance().clear()
    try:
        yield Hydra.create_main_hydra2(task_name="pqsweep", config_search_path=search_path)
    finally:
        GlobalHydra.instance().clear()


def compose(hydra: Hydra, config_name: str, overrides: list[str]) -> DictConfig:
    from hydra.types import RunMode

    return hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN, with_log_configuration=False)


def with_hydra_values(hydra: Hydra, config_name: str, fixed: list[str], overrides: list[str], cfg: DictConfig):
    """The config with the command's hydra.* values too (hydra.sweeper.n_jobs=0, hydra.run.dir=...), which `expand`
    leaves out of the composition the values are checked on; `cfg` where they do not compose (Hydra says why)."""
    values = [o for o in overrides if o.split("=", 1)[0].startswith("hydra.") and "=" in o
              and o.split("=", 1)[0] != "hydra.searchpath" and "," not in o.split("=", 1)[1]]
    try:
        return compose(hydra, config_name, fixed + values) if values else cfg
    except Exception:  # noqa: BLE001 - Hydra refuses them itself, in its own words
        return cfg


def check(overrides: list[str], config_name: str = "config", config_dir: str | None = None,
          require: Callable[[DictConfig], None] | None = None, multirun: bool = False) -> str | None:
    """Returns the one-line error of the first bad value, or None when every value composes and validates and the
    places and services the command uses can be used (pqsweep.environment).

    `require` adds an app's own rule (the sensitivity scan's) to `validate`.
    """

    def checked(cfg: DictConfig) -> None:
        validate(cfg)
        if require is not None:
            require(cfg)

    register()  # the schemas the option files start from
    with hydra_context(config_dir) as hydra:
        search = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "hydra.searchpath"]
        try:
            fixed, sweeps = expand(overrides)
            cfg = compose(hydra, config_name, fixed)
            checked(cfg)
            refuse_first(environment.checks(with_hydra_values(hydra, config_name, fixed, overrides, cfg), multirun))
        except Exception as error:  # noqa: BLE001 - every failure becomes one line
            return one_line(" ".join(overrides), error, config_name, search, hydra)
        # A sweep file's own grid (hydra.sweeper.params) is checked like a command-line sweep, except for the
        # keys the command line sets itself: those replace the file's grid entries.
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        given = command_line_keys(overrides, GlobalHydra.instance().config_loader())
        sweeps += expand([f"{k}={v}" for k, v in params.items() if k not in given])[1]
        for alternatives in sweeps:
            for override in alternatives:
                key, _, value = override.partition("=")
                if per_layer_field(cfg, key):  # one value per layer: checked as one layer's (no model built here)
                    override = f"++{key}={{{PROBE_LAYER}:{value}}}"
                try:
                    checked(compose(hydra, config_name, fixed + [override]))
                except Exception as error:  # noqa: BLE001
                    # a per-layer value is refused under the key the command swept, not the probe's
                    return one_line(override, error, config_name, search, hydra).replace(f".{PROBE_LAYER}=", "=")
    return None


def preflight(argv: list[str], prog: str = "pqsweep", config_name: str = "config",
              require: Callable[[DictConfig], None] | None = None) -> None:
    # intermixed, as Hydra parses: overrides on both sides of a flag (`pqsweep a=1 -m b=2,3`) are all checked
    args, _ = get_args_parser().parse_known_intermixed_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return  # Hydra answers these itself
    problem = check(args.overrides, args.config_name or config_name, args.config_dir, require, args.multirun)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(1)
