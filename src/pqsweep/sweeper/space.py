"""What a sweep searches, with no storage and no MLflow: the swept keys and their distributions, a grid's points
(narrowed by the command line), the keys only some options of a swept group have, and which points are still to run.

A sweep file's grid (`hydra.sweeper.params`) and the command line's sweeps are parsed by the Optuna plugin's own
parser, so both speak its syntax (`a,b,c`, `range(...)`, `interval(...)`, `tag(log, ...)`). A value given on the
command line for a key of the file's grid selects those points of the same study; any other swept key joins the
space. In a grid the late keys (pqsweep.identity.is_late: quantization, measurement, export) vary fastest, so the
points that share a prune stage run one after another and compute it once.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from hydra.core.override_parser.types import FloatRange
# The plugin's parser of its sweep syntax, in a private module: using it keeps one syntax for both sweepers.
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution,
                                  distribution_to_json)

from pqsweep.console import plural


LAYER_SEP = "/"  # a per-layer param's name: `<field>/<layer>` (MLflow allows it in param keys, Hydra's grammar not)


def short(name: str) -> str:
    """A swept key as a progress line shows it: its last part, a per-layer param as `layer_bits[layer1.0.conv1]`."""
    key, _, layer = name.partition(LAYER_SEP)
    return f"{key.rsplit('.', 1)[-1]}[{layer}]" if layer else key.rsplit(".", 1)[-1]


class StudyMismatch(Exception):
    """The command asks for what its study cannot be or hold; the message is one line, and nothing was written."""


def grid_choices(distribution: BaseDistribution) -> list[Any]:
    """A discrete distribution's values, as a grid takes them."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        values = list(FloatRange(distribution.low, distribution.high, distribution.step))
        return values if values and values[-1] == distribution.high else values + [distribution.high]
    raise StudyMismatch(f"a grid takes discrete values; {distribution} is continuous: use a sampler (tpe, nsgaii)")


def norm(value: Any) -> Any:
    """0 and 0.0 are one grid value."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def point_key(params: dict[str, Any], names: Iterable[str]) -> tuple:
    return tuple((name, norm(params.get(name))) for name in names)


def as_number(text: Any) -> Any:
    """A fixed value from the command line comes as text ("0.0"): as a number where it reads as one."""
    try:
        return float(text) if isinstance(text, str) else norm(text)
    except ValueError:
        return text


def in_grid(key: str, value: Any, choices: list[Any], study: str) -> Any:
    """The grid's own value that `value` names (0 for 0.0 and "0.0"), or StudyMismatch."""
    for choice in choices:
        if norm(choice) == norm(value) or str(choice) == str(value) or norm(choice) == as_number(value):
            return choice
    raise StudyMismatch(f"{key}={value} is not in the grid of study {study} ({', '.join(map(str, choices))}); "
                        f"choose among those, or start a new study with study.name=<new name>")


@dataclass(frozen=True)
class Space:
    grid: bool
    distributions: dict[str, BaseDistribution]  # every swept key's (a grid's: the file's, before narrowing)
    choices: dict[str, list[Any]] = field(default_factory=dict)  # a grid's values per key, late keys last
    overrides: tuple[str, ...] = ()  # what every trial gets besides its point
    conditions: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)  # key -> (its group, options having it)
    # a per-layer field -> its layers: params `<field>/<layer>`, given to a trial as one override (pqsweep.allocation)
    layered: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def swept(self) -> list[str]:
        return list(self.distributions)

    def points(self) -> list[dict[str, Any]]:
        """A grid's points, in the order they run."""
        names = list(self.choices)
        return [dict(zip(names, values)) for values in itertools.product(*self.choices.values())]

    def key(self, params: dict[str, Any]) -> tuple:
        """Which grid point `params` is."""
        return point_key(params, self.choices)

    def stored(self) -> dict[str, str]:
        """What the study stores as its search space (a later command must search the same)."""
        return {name: distribution_to_json(d) for name, d in self.distributions.items()}

    def logged(self) -> list[str]:
        """The swept keys as a trial's run logs them as params: a per-layer param `<field>/<layer>` as
        `<field>.<layer>` (the report's and the MLflow view's columns)."""
        return [name.replace(LAYER_SEP, ".") for name in self.distributions]

    def assignments(self, params: dict[str, Any]) -> tuple[str, ...]:
        """A trial's overrides for its point: `key=value` each, a per-layer field's params as one mapping."""
        mappings = {key: {} for key in self.layered}
        plain = []
        for name, value in params.items():
            key, _, layer = name.partition(LAYER_SEP)
            if key in mappings and layer:
                mappings[key][layer] = value
            else:
                plain.append(f"{name}={value}")
        return tuple(plain) + tuple(f"++{key}={{{','.join(f'{layer}:{v}' for layer, v in values.items())}}}"
                                    for key, values in mappings.items() if values)

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's values for the swept keys (a queued grid point's own, else the sampler's), by Optuna's public
        suggest API; a conditional key only where the option chosen for its group has it (groups come first)."""
        params: dict[str, Any] = {}
        for name, distribution in self.distributions.items():
            group, options = self.conditions.get(name, (None, ()))
            if group is None or params[group] in options:
                params[name] = suggest(trial, name, distribution)
        return params


def suggest(trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def build(file_params: dict[str, Any], arguments: list[str], grid: bool, late: Callable[[str], bool],
          study: str) -> Space:
    """The space of a sweep file's grid (`file_params`) and the command line's `arguments`."""
    file_space, file_fixed, _ = create_params_from_overrides([f"{k}={v}" for k, v in file_params.items()])
    cli_space, cli_fixed, deletes = create_params_from_overrides(arguments)
    distributions = dict(file_space)
    choices = {k: grid_choices(d) for k, d in file_space.items()} if grid else {}
    for key, distribution in cli_space.items():
        if grid and key in file_space:  # a subset of the file's grid: the same study
            choices[key] = [in_grid(key, v, choices[key], study) for v in grid_choices(distribution)]
        else:
            distributions[key] = distribution
            if grid:
                choices[key] = grid_choices(distribution)
    fixed = {**file_fixed, **cli_fixed}
    for key, value in cli_fixed.items():
        if key in file_space:
            if grid:
                choices[key] = [in_grid(key, value, choices[key], study)]
            else:
                del distributions[key]  # a budgeted search keeps the plugin's rule: the command line fixes the key
                continue
            del fixed[key]
    if grid and not choices:
        raise StudyMismatch("a grid sweep needs swept keys: give some (key=a,b) or choose a sweep file")
    choices = dict(sorted(choices.items(), key=lambda item: late(item[0])))
    overrides = tuple(f"{k}={v}" for k, v in fixed.items()) + tuple(deletes)
    return Space(grid, distributions, choices, overrides)


SEED = "train.seed"


def with_seeds(space: Space, first: int, n: int) -> Space:
    """The grid with train.seed as one more axis, first .. first + n - 1 (study.seeds=n), varied slowest, so each
    seed's points run one after another and share that seed's baseline."""
    if n == 1:
        return space
    if not space.grid:
        raise StudyMismatch(f"study.seeds={n} is not allowed: must be 1 with a search sampler, which samples each "
                            "point once (sweep train.seed among the keys it searches, or use the grid sampler)")
    if SEED in space.distributions:
        raise StudyMismatch(f"study.seeds={n} is not allowed: must be 1 where train.seed is swept itself (the seeds "
                            f"{', '.join(map(str, space.choices[SEED]))} are already an axis)")
    seeds = list(range(first, first + n))
    distributions = {SEED: CategoricalDistribution(seeds), **space.distributions}
    overrides = tuple(o for o in space.overrides if not o.startswith(SEED + "="))  # the first seed is the point's
    return Space(True, distributions, {SEED: seeds, **space.choices}, overrides, space.conditions, space.layered)


def with_conditions(space: Space, compose: Callable[[list[str]], DictConfig]) -> tuple[Space, list[str]]:
    """The space with its conditional keys, and a line for each: a swept key `g.k` under a swept group `g` that not
    every option of `g` has (fake_quant's bits_w) is suggested only where the chosen option has it, as Optuna's
    define-by-run intends (TPE and NSGA-II take conditional parameters).

    `compose(overrides)` composes a trial's config; each option is composed once, with the fixed overrides, and the
    config it gives decides: no hand-kept table to go stale. A grid has none (the pre-run check composes each of its
    values alone, so it already refuses a key that some option lacks)."""
    if space.grid:
        return space, []
    absent, conditions, said = object(), {}, []
    for group, distribution in space.distributions.items():
        keys = [key for key in space.distributions if key.startswith(group + ".")]
        if not keys or not isinstance(distribution, CategoricalDistribution):
            continue
        having: dict[str, list[Any]] = {key: [] for key in keys}
        for option in distribution.choices:
            composed = compose([*space.overrides, f"{group}={option}"])
            for key in keys:
                if OmegaConf.select(composed, key, default=absent) is not absent:
                    having[key].append(option)
        for key, options in having.items():
            if not options:
                raise StudyMismatch(f"{key}: no option of {group} ({', '.join(map(str, distribution.choices))}) "
                                    f"has it; sweep it with {group} fixed to an option that has it")
            if len(options) < len(distribution.choices):
                conditions[key] = (group, options)
                said.append(f"{key} is suggested only with {group}={','.join(map(str, options))}")
    ordered = dict(sorted(space.distributions.items(), key=lambda item: item[0] in conditions))  # groups first
    return Space(space.grid, ordered, space.choices, space.overrides, conditions, space.layered), said


# -- a grid's bookkeeping: which points are done, queued, to run again --------------------------------------------


def remaining(space: Space, complete: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid points without a COMPLETE trial: what this command still has to run."""
    done = {space.key(params) for params in complete}
    return [p for p in space.points() if space.key(p) not in done]


def to_enqueue(space: Space, taken: Iterable[dict[str, Any]], attempted: set[tuple]) -> list[dict[str, Any]]:
    """The points to queue now: none of their trials is done, running or queued (`taken`), and this run has not
    tried them already (a point that failed waits for the next command, so one bad point cannot loop)."""
    busy = {space.key(params) for params in taken}
    return [p for p in space.points() if space.key(p) not in busy and space.key(p) not in attempted]


def taken_by_another(space: Space, point: dict[str, Any] | None, others: Iterable[dict[str, Any]]) -> bool:
    """Whether a trial about to run `point` should run nothing: it came from no queue (None), or another trial of the
    point is COMPLETE or RUNNING (another worker took it meanwhile)."""
    return point is None or any(space.key(params) == space.key(point) for params in others)


def plan(space: Space, complete: list[dict[str, Any]], n_trials: int) -> str:
    if space.grid:
        todo = len(remaining(space, complete))
        total = len(space.points())
        return f"{plural(total, 'grid point')}, {total - todo} done, {todo} to run"
    return f"{len(complete)} of n_trials={plural(n_trials, 'trial')} done"


def grid_tag(space: Space) -> str:
    """The grid as the parent run's `grid` tag."""
    return json.dumps(space.choices, default=str)[:5000]
