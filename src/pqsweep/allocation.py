"""Per-layer allocation as a search: a swept per-layer field becomes one parameter per prunable layer of the model.

A per-layer field is a mapping {layer: value} on its schema (pruning.layer_sparsity, quantization.layer_bits,
mixed's quantization.layers). Swept with one distribution, it asks for that distribution in every prunable layer:

    pqsweep -m sweep=allocation_cnn_mnist5k                       (the sweep file's hydra.sweeper.params say)
    pqsweep -m model=cnn dataset=digits pruning=layer_magnitude quantization=fake_quant \\
        hydra/sweeper=pqsweep hydra/sweeper/sampler=nsgaii hydra.sweeper.n_trials=16 \\
        'pruning.layer_sparsity=choice(0.0,0.5,0.75,0.9)' 'quantization.layer_bits=choice(2,4,8,16,32)' \\
        'study.objectives=[top1,size_theoretical_mb]' 'study.constraints=["size_theoretical_mb<=0.02"]'

The sweeper composes the trial's config, builds the model (no training) and expands the key into Optuna params
`<key>/<layer>` (stored as the study's search space, so a resume compares them); a trial's values go back as one
override per field, `<key>={layer: value, ...}`, which shapes the stages the field declares (sparsity: the prune
stage; bits: the trial). Before any store is written it refuses, in one line, a model with no prunable layer and a
study.constraints bound on size_theoretical_mb or macs that even the most compressed allocation of the space misses
(measured: that allocation applied by the configured pruner and quantizer to the untrained model, then measured).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution

from pqsweep.schema import per_layer_field
from pqsweep.sweeper.space import LAYER_SEP as SEP
from pqsweep.sweeper.space import Space, StudyMismatch, grid_choices

# The per-layer fields whose most compressed value is known: the budget check and the sensitivity allocation use them
MOST_COMPRESSED = {"pruning.layer_sparsity": max, "quantization.layer_bits": min}
BOUNDED = ("size_theoretical_mb", "macs")  # metrics an allocation's reach is measured in, before training


def per_layer_keys(space: Space, cfg: DictConfig) -> list[str]:
    """The swept keys whose field is a mapping {layer: value} in the trial's config."""
    return [key for key in space.distributions if SEP not in key and per_layer_field(cfg, key)]


def param(key: str, layer: str) -> str:
    return f"{key}{SEP}{layer}"


def model_and_data(cfg: DictConfig):
    """(the untrained model, loaders, one example input) as a trial builds them, from the data set's own builder:
    nothing is cached or written, so a refused command leaves no trace."""
    from hydra.utils import get_method
    from torch.utils.data import DataLoader

    from pqsweep.data import limited
    from pqsweep.pipeline import build_model
    from pqsweep.train import seed_everything

    seed_everything(cfg.train.seed)
    splits = limited(get_method(cfg.dataset._target_)(cfg.dataset), cfg.dataset.num_samples)
    model = build_model(cfg, splits).cpu().eval()
    loaders = {name: DataLoader(getattr(splits, name), batch_size=cfg.train.batch_size)
               for name in ("train", "val", "test")}
    return model, loaders, next(iter(loaders["test"]))[0][:1]


def layer_names(model) -> list[str]:
    from pqsweep.weights import stored_weights

    return [w.name for w in stored_weights(model)]


def values(distribution: BaseDistribution, points: int = 5) -> list:
    """A distribution's values: a discrete one's own, a continuous one's `points` evenly spaced from low to high."""
    try:
        return grid_choices(distribution)
    except StudyMismatch:
        step = (distribution.high - distribution.low) / (points - 1)
        return [distribution.low + i * step for i in range(points)]


def describe(distribution: BaseDistribution) -> str:
    try:
        return f"choice({','.join(map(str, grid_choices(distribution)))})"
    except StudyMismatch:
        return str(distribution)


def expand(space: Space, cfg: DictConfig, layers: list[str]) -> Space:
    """`space` with each per-layer key replaced by one param per layer, in the model's order."""
    keys = per_layer_keys(space, cfg)
    if not keys:
        return space
    if space.grid:
        raise StudyMismatch(f"{keys[0]}={describe(space.distributions[keys[0]])} is not allowed: must be swept by a "
                            f"search sampler (hydra/sweeper/sampler=nsgaii or tpe): in a grid it is {len(layers)} axes")
    if not layers:
        raise StudyMismatch(f"{keys[0]}={describe(space.distributions[keys[0]])} is not allowed: must be swept over a "
                            f"model with a prunable layer (Conv2d or Linear); model={cfg.model.name} has none")
    distributions: dict[str, BaseDistribution] = {}
    for key, distribution in space.distributions.items():
        for name in ([param(key, layer) for layer in layers] if key in keys else [key]):
            distributions[name] = distribution
    return replace(space, distributions=distributions, layered={key: tuple(layers) for key in keys})


def most_compressed(space: Space) -> dict[str, dict[str, object]]:
    """{per-layer key: {layer: its most compressed choice}} for the keys MOST_COMPRESSED knows."""
    out = {}
    for key, layers in space.layered.items():
        if key in MOST_COMPRESSED:
            pick = MOST_COMPRESSED[key](values(space.distributions[param(key, layers[0])]))
            out[key] = {layer: pick for layer in layers}
    return out


def compressed(model, cfg: DictConfig, ctx, allocation: dict[str, dict[str, object]]):
    """(deployed, float) `model` through the configured pruner and quantizer with `allocation`'s per-layer values."""
    from hydra.utils import get_method

    from pqsweep.pruning import prune

    nodes = {group: OmegaConf.create(OmegaConf.to_container(cfg[group], resolve=True))
             for group in ("pruning", "quantization")}
    for key, values in allocation.items():
        group, field = key.split(".", 1)
        nodes[group][field] = dict(values)
    float_model = prune(copy.deepcopy(model), nodes["pruning"], ctx).cpu().eval()
    return get_method(nodes["quantization"]._target_)(float_model, nodes["quantization"], ctx), float_model


def reach(cfg: DictConfig, space: Space, model, loaders, example) -> dict[str, float]:
    """size_theoretical_mb and macs of the most compressed allocation of `space`, measured on `model`."""
    from pqsweep import measure
    from pqsweep.train import Context

    deployed, float_model = compressed(model, cfg, Context(loaders, example, cfg.train), most_compressed(space))
    return {"size_theoretical_mb": measure.sizes(deployed)["size_theoretical_mb"],
            "macs": measure.macs(float_model, example)}


def refuse_unreachable(bounds, reached: dict[str, float], space: Space) -> None:
    """StudyMismatch for the first upper bound on a measured metric that the most compressed allocation misses."""
    for bound in bounds:
        if bound.metric in reached and bound.op.startswith("<") and reached[bound.metric] > bound.limit:
            extreme = ", ".join(f"{key.rsplit('.', 1)[-1]}={next(iter(values.values()))}"
                                for key, values in most_compressed(space).items())
            raise StudyMismatch(f"study.constraints={bound.metric}{bound.op}{bound.limit:g} is not allowed: must be "
                                f"at least {reached[bound.metric]:.6g}, the {bound.metric} of this space's most "
                                f"compressed allocation (every layer at {extreme or 'its configured setting'}), "
                                "measured before training: no allocation reaches less")


def prepare(space: Space, compose: Callable[[list[str]], DictConfig], bounds) -> tuple[Space, DictConfig | None]:
    """The space with its per-layer keys expanded, after the budget check; and the trial config it composed (None
    where nothing is per-layer)."""
    cfg = compose(list(space.overrides))
    if not per_layer_keys(space, cfg):
        return space, None
    model, loaders, example = model_and_data(cfg)
    space = expand(space, cfg, layer_names(model))
    refuse_unreachable(bounds, reach(cfg, space, model, loaders, example), space)
    return space, cfg
