"""What a sweep command asks for, made ready before the loop starts: the sampler, the space (pqsweep.sweeper.space),
the study's name, its constraints, and the ledger of the study (created, or resumed where the command fits it).
Every refusal (a bad constraint, a point outside the grid, a changed setting) comes before any store is written."""

from __future__ import annotations

import dataclasses
import functools
import logging

import optuna
from hydra.utils import instantiate
from omegaconf import ListConfig, open_dict

from pqsweep import allocate, allocation, identity, tracking
from pqsweep.metrics import METRICS, directions
from pqsweep.reports.pareto import parse_bounds
from pqsweep.sweeper import space as spaces
from pqsweep.sweeper import study as studies
from pqsweep.sweeper import variation
from pqsweep.sweeper.ledger import Ledger, constraint_name
from pqsweep.sweeper.space import Space, StudyMismatch

log = logging.getLogger("pqsweep.sweeper")
ADHOC = "adhoc"  # study.name's default: a command-line grid is then named after its swept keys
SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")


def bounds_of(config) -> list:
    """study.constraints as Bounds, or StudyMismatch naming the bad one (before any store is opened)."""
    bounds = []
    for text in config.study.constraints:
        try:
            parsed = parse_bounds(text)
        except ValueError as error:
            raise StudyMismatch(f"study.constraints={text}: {error}") from None
        unknown = [b.metric for b in parsed if b.metric not in METRICS]
        if unknown or not parsed:
            raise StudyMismatch(f"study.constraints={text}: {unknown[0] if unknown else 'empty'}: bound a "
                                f"metric among {', '.join(METRICS)} (e.g. size_gzip_mb<=0.02)")
        bounds += parsed
    return bounds


def prepare(plugin, arguments: list[str]) -> tuple[Space, Ledger]:
    """The space, then the study: a command the study refuses writes nothing."""
    if plugin.custom_search_space:
        raise StudyMismatch(f"hydra.sweeper.custom_search_space={plugin.custom_search_space} is not allowed: must be "
                            "null (pqsweep's sweeper takes its space from the sweep file and the command line, and "
                            "suggests a key only some options have only with them)")
    config = plugin.config
    objectives = list(config.study.objectives)
    if plugin.direction is not None:
        given = plugin.direction if isinstance(plugin.direction, (list, tuple, ListConfig)) else [plugin.direction]
        if [getattr(d, "name", str(d)) for d in given] != directions(objectives):
            log.warning("hydra.sweeper.direction=%s ignored: the directions follow study.objectives %s: %s",
                        plugin.direction, objectives, directions(objectives))
    sampler = instantiate(plugin.sampler, _execution_whitelist_=SAMPLERS)
    grid = isinstance(sampler, functools.partial) and sampler.func.__name__ == "GridSampler"
    name = plugin.study_name or ADHOC
    space = spaces.build(dict(plugin.params or {}), arguments, grid, lambda key: identity.is_late(config, key),
                         name)
    space = spaces.with_seeds(space, config.train.seed, config.study.seeds)
    bounds = bounds_of(config)
    loader = plugin.hydra_context.config_loader
    space, said = spaces.with_conditions(space, lambda overrides: loader.load_sweep_config(config, overrides))
    for line in said:
        log.info("%s", line)
    # a swept per-layer field becomes a param per prunable layer; the model is built (not trained) to name them
    space, trial_config = allocation.prepare(space, lambda overrides: loader.load_sweep_config(config, overrides),
                                             bounds)
    if name == ADHOC and space.swept:
        name = "+".join(space.swept)
    name, why = variation.name_for(plugin, name, space.swept)
    if why:  # its trials, its experiment (tracking.experiment: ${study.name}) and its sweep folder follow the name
        log.info("%s", why)
        with open_dict(config):
            config.study.name = name
        space = dataclasses.replace(space, overrides=space.overrides + (f"study.name={name}",))
    if bounds and "constraints_func" not in config.hydra.sweeper.sampler:
        log.warning("study.constraints %s: not followed by the %s sampler, which runs its trials whatever they "
                    "measure (their constraint values are recorded); tpe and nsgaii spend their trials within "
                    "them", list(config.study.constraints),
                    "grid" if grid else config.hydra.sweeper.sampler._target_.rsplit(".", 1)[-1])
    if config.study.early_stop.enabled and grid:
        log.info("study.early_stop with the grid sampler: a point that cannot reach the front is stopped (PRUNED) "
                 "and not run again on resume, so its row stays empty in reports")
    storage = plugin.storage or studies.default_storage(tracking.resolve_uri(config.tracking.uri))
    # the swept keys as the trials log them (pqsweep-report's columns); a per-layer field's own key is in none
    params = {f"sweeper.{k}": str(v) for k, v in (plugin.params or {}).items() if k not in space.layered}
    params |= {f"space.{k}": str(v) for k, v in zip(space.logged(), space.distributions.values())}
    params |= {"sweeper": "pqsweep", "sampler": "grid" if grid else type(sampler).__name__,
               "objectives": ",".join(objectives)}
    if bounds:
        params["constraints"] = ",".join(constraint_name(b) for b in bounds)
    # a grid's points are enqueued: the sampler that asks for them needs no search space of its own
    ledger = Ledger.open(config, name, space, optuna.samplers.RandomSampler() if grid else sampler, storage,
                         plugin.heartbeat_interval, bounds, params)
    if trial_config is not None and config.study.allocations and not ledger.study.trials:
        allocate.enqueue(ledger.study, trial_config, space, list(config.study.allocations))
    return space, ledger
