"""A per-layer allocation for each size budget of study.allocations, from each layer's measured sensitivity, enqueued
as a new study's first trials: the search starts from what a one-shot allocator (HAWQ's kind) would return.

Sensitivity, measured on the trained baseline (the trials' own cached stage: trained here once if missing): the
increase of the validation loss when one layer alone takes one value of a per-layer field (a sparsity, a bit width)
through the configured pruner and quantizer, every other layer at the least compressed value. Assumed additive over
layers and fields, as HAWQ's and Fisher-trace allocators assume. Size, the same for every layer: non-zero weights x
bits / 8, plus the rest of the model as measured (size_theoretical_mb's definition). For each budget the allocation
starts least compressed and takes, one at a time, the step (one layer one value further on one field) that costs the
least loss per byte saved, until the predicted size fits. The validation split, never the test split, decides.
"""

from __future__ import annotations

import logging
from itertools import product

import torch
from omegaconf import DictConfig
from torch import nn

from pqsweep import allocation, measure
from pqsweep.sweeper.space import Space, short

log = logging.getLogger("pqsweep.allocate")
ALLOCATION_ATTR = "pqsweep.allocation"  # on an enqueued trial: the budget it was allocated for
ORDER = {"pruning.layer_sparsity": 1, "quantization.layer_bits": -1}  # +1: a larger value compresses more


@torch.no_grad()
def val_loss(model: nn.Module, loader) -> float:
    total, n = 0.0, 0
    for x, y in loader:
        total += nn.functional.cross_entropy(model(x).float(), y, reduction="sum").item()
        n += len(y)
    return total / n


def ladders(space: Space) -> dict[str, list]:
    """Each known per-layer field's choices, least compressed first."""
    return {key: sorted(allocation.values(space.distributions[allocation.param(key, layers[0])]),
                        key=lambda v: ORDER[key] * v)
            for key, layers in space.layered.items() if key in ORDER}


def trained(cfg: DictConfig):
    """The baseline as a trial gets it (its cached stage), the loaders, an example input."""
    from pqsweep.pipeline import baseline, build_model, load_data, stages_of
    from pqsweep.train import seed_everything

    seed_everything(cfg.train.seed)
    stages = stages_of(cfg)
    splits, loaders = load_data(cfg, stages)
    model = build_model(cfg, splits)
    model.load_state_dict(baseline(cfg, stages, model, loaders).state)
    return model.cpu().eval(), loaders, next(iter(loaders["test"]))[0][:1]


def sensitivities(cfg: DictConfig, space: Space, model, loaders, example) -> tuple[dict, float]:
    """({(field, layer, value): validation loss increase}, the least compressed model's size in bytes)."""
    from pqsweep.train import Context

    ctx = Context(loaders, example, cfg.train)
    steps = ladders(space)
    least = {key: {layer: values[0] for layer in space.layered[key]} for key, values in steps.items()}

    def loss(allocation_: dict) -> float:
        return val_loss(allocation.compressed(model, cfg, ctx, allocation_)[0], loaders["val"])

    count = sum(len(space.layered[key]) * (len(values) - 1) for key, values in steps.items())
    log.info("study.allocations: measuring each layer's sensitivity: %d compressions, each evaluated on the "
             "validation split", count)  # minutes on resnet18_cifar: say so before the wait
    deployed, _ = allocation.compressed(model, cfg, ctx, least)
    reference = val_loss(deployed, loaders["val"])
    rise = {}
    for key, values in steps.items():
        for layer, value in product(space.layered[key], values[1:]):
            rise[(key, layer, value)] = loss({**least, key: {**least[key], layer: value}}) - reference
    return rise, measure.sizes(deployed)["size_theoretical_mb"] * 1e6


def layer_bytes(n: int, sparsity: float, bits: int) -> float:
    return (n - round(sparsity * n)) * bits / 8  # as the pruner counts its zeros, as size_theoretical_mb its bits


def choose(rise: dict, steps: dict[str, list], counts: dict[str, int], fixed: dict[str, float], least_bytes: float,
           budget: float) -> dict[str, dict[str, object]] | None:
    """The greedy allocation for `budget` bytes (see the module doc), or None where even the last step misses it.
    `fixed`: the sparsity and bits of a field that is not swept, the same in every layer."""
    at = {key: {layer: 0 for layer in counts} for key in steps}  # index into each ladder

    def value(key: str, layer: str, index: int | None = None):
        if key not in steps:
            return fixed[key]
        return steps[key][at[key][layer] if index is None else index]

    def size_of(layer: str, **moved) -> float:
        sparsity = moved.get("pruning.layer_sparsity", value("pruning.layer_sparsity", layer))
        bits = moved.get("quantization.layer_bits", value("quantization.layer_bits", layer))
        return layer_bytes(counts[layer], sparsity, bits)

    rest = least_bytes - sum(size_of(layer) for layer in counts)
    while rest + sum(size_of(layer) for layer in counts) > budget:
        best = None
        for key, layer in product(steps, counts):
            index = at[key][layer] + 1
            if index >= len(steps[key]):
                continue
            saved = size_of(layer) - size_of(layer, **{key: steps[key][index]})
            if saved <= 0:
                continue
            before = rise.get((key, layer, steps[key][index - 1]), 0.0) if index > 1 else 0.0
            cost = max(rise[(key, layer, steps[key][index])] - before, 0.0) + 1e-9
            if best is None or cost / saved < best[0]:
                best = (cost / saved, key, layer)
        if best is None:
            return None
        at[best[1]][best[2]] += 1
    return {key: {layer: value(key, layer) for layer in counts} for key in steps}


def enqueue(study, cfg: DictConfig, space: Space, fractions: list[float]) -> list[dict]:
    """One sensitivity allocation per budget in `fractions` (of the fp32 model's size_theoretical_mb), enqueued as
    the study's first trials (duplicates once); returns their params."""
    from pqsweep.weights import stored_weights

    steps = ladders(space)
    if not steps:
        log.warning("study.allocations: no per-layer sparsity or bits swept; no allocation enqueued")
        return []
    model, loaders, example = trained(cfg)
    fp32 = measure.sizes(model)["size_theoretical_mb"] * 1e6
    counts = {w.name: w.magnitude().numel() for w in stored_weights(model)}
    fixed = {"pruning.layer_sparsity": float(cfg.pruning.amount), "quantization.layer_bits": int(cfg.quantization.bits)}
    rise, least_bytes = sensitivities(cfg, space, model, loaders, example)
    queued: list[dict] = []
    for fraction in fractions:
        chosen = choose(rise, steps, counts, fixed, least_bytes, fraction * fp32)
        if chosen is None:
            log.warning("study.allocations: %g of the fp32 size is below what this space reaches; none enqueued",
                        fraction)
            continue
        params = {allocation.param(key, layer): v for key, values in chosen.items() for layer, v in values.items()}
        if params in queued:
            continue
        study.enqueue_trial(params, user_attrs={ALLOCATION_ATTR: f"sensitivity@{fraction:g}"})
        queued.append(params)
        log.info("study.allocations: enqueued the sensitivity allocation for %g x the fp32 size: %s", fraction,
                 " ".join(f"{short(k)}={v}" for k, v in params.items()))
    return queued
