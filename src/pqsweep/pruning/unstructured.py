"""Unstructured pruning: magnitude (global or per layer) and the random control, on the weights as stored.

Each pruner is `fn(model, cfg, ctx) -> model`: it zeroes round(amount * n) weights and returns the model. They
work on `pqsweep.weights.stored_weights`, so they prune a float, fp16/bf16, torch.ao int8 or PT2E int8 model alike
(`quantization.order=quantize_then_prune` prunes the deployed model in its own domain, as 001_17951392d90394c9.txt
does; their option files say `stored_weights: true`). Every layer ranks by the magnitude of the value a weight
stands for (dequantized for int8), so one global ranking compares layers of different scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import nn

from pqsweep.weights import StoredWeight, relowered, stored_weights

def magnitude(weight: StoredWeight) -> torch.Tensor:
    return weight.magnitude()


def _zero_lowest(weights: list[StoredWeight], scores: list[torch.Tensor], count: int) -> None:
    """Zero the `count` weights with the lowest scores over all `weights` together.

    Ties are broken by position (layer order, then row-major), so the count is exact and the result repeatable.
    A threshold from kthvalue, not a full argsort: it needs a quarter of the memory on VGG-sized models.
    """
    if count <= 0:
        return
    flat = torch.cat([s.flatten() for s in scores])
    threshold = flat.kthvalue(count).values
    chosen = flat < threshold
    ties = (flat == threshold).nonzero().flatten()
    chosen[ties[: count - int(chosen.sum())]] = True
    for weight, score, mask in zip(weights, scores, chosen.split([s.numel() for s in scores])):
        weight.set_zero(mask.view_as(score))


def _count(amount: float, n: int) -> int:
    return int(round(amount * n))


def layer_amounts_for(weights: list[StoredWeight], cfg, default: float) -> list[float]:
    """Per-layer amounts: `pruning.layer_amounts` for the layers it names, `default` for the rest."""
    named = read_layer_amounts(cfg)
    unknown = sorted(set(named) - {w.name for w in weights})
    if unknown:
        raise ValueError(f"pruning.layer_amounts={cfg.layer_amounts}: no prunable layer named {', '.join(unknown)} "
                         f"(layers: {', '.join(w.name for w in weights)})")
    return [named.get(w.name, default) for w in weights]


def refuse_layer_amounts(cfg, method: str) -> None:
    if cfg.get("layer_amounts") or cfg.get("layer_sparsity"):
        raise ValueError(f"pruning.layer_amounts={cfg.layer_amounts}: per-layer amounts need a per-layer method, "
                         f"not {method} (use pruning=layer_magnitude, or iterative with scope=layer)")


def weights_to_prune(model: nn.Module, amount: float) -> list[StoredWeight]:
    weights = stored_weights(model)
    if amount > 0 and not weights:
        raise ValueError(f"pruning.amount={amount}: {type(model).__name__} has no weights this pruner can reach "
                         "(float Conv2d/Linear, torch.ao int8 Conv2d/Linear, PT2E int8 graphs)")
    return weights


def prune_by_score(weights: list[StoredWeight], score: Callable, amount: float | list[float]) -> None:
    """One `amount` for all weights ranked together, or one per layer (a list) ranked within each layer."""
    if isinstance(amount, list):
        for weight, layer_amount in zip(weights, amount):
            scores = score(weight)
            _zero_lowest([weight], [scores], _count(layer_amount, scores.numel()))
    else:
        scores = [score(w) for w in weights]
        _zero_lowest(weights, scores, _count(amount, sum(s.numel() for s in scores)))


def no_pruning(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """The dense baseline: keep every weight."""
    return model


def global_magnitude(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """Unstructured magnitude pruning ranked over all prunable layers together (Han et al.): zeroes the
    round(amount * n) weights of smallest |value| among all n prunable weights."""
    refuse_layer_amounts(cfg, "global_magnitude")
    prune_by_score(weights_to_prune(model, cfg.amount), magnitude, float(cfg.amount))
    return relowered(model)


def layer_magnitude(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """Unstructured magnitude pruning layer by layer: round(amount * n_l) smallest weights of each layer l, with
    `amount` from `pruning.layer_amounts` for the layers that file names and `pruning.amount` for the rest."""
    weights = weights_to_prune(model, cfg.amount)
    prune_by_score(weights, magnitude, layer_amounts_for(weights, cfg, float(cfg.amount)))
    return relowered(model)


def random_weights(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """Random unstructured pruning, the control of every pruning study: round(amount * n) weights over all layers
    (per layer, with `pruning.layer_amounts`), chosen uniformly at random, seeded by `train.seed` (0 without a ctx).

    Weights already zero (int8 rounding, earlier pruning) count first and the rest are drawn uniformly among the
    survivors, so `amount` is the sparsity reached, as with the magnitude pruners.
    """
    seed = ctx.train_cfg.seed if ctx is not None and ctx.train_cfg is not None else 0
    generator = torch.Generator().manual_seed(int(seed))

    def score(weight: StoredWeight) -> torch.Tensor:
        magnitude = weight.magnitude()
        draw = torch.rand(magnitude.shape, generator=generator)
        return draw.masked_fill(magnitude == 0, -1.0)

    weights = weights_to_prune(model, cfg.amount)
    per_layer = cfg.get("layer_amounts") or cfg.get("layer_sparsity")
    prune_by_score(weights, score, layer_amounts_for(weights, cfg, float(cfg.amount)) if per_layer else float(cfg.amount))
    return relowered(model)


def read_layer_amounts(cfg) -> dict[str, float]:
    """`pruning.layer_amounts`: a YAML file {layer name: amount} (pqsweep-sensitivity writes one), a mapping (the
    scan passes one), or {} if unset; `pruning.layer_sparsity`'s inline amounts over it."""
    inline = cfg.get("layer_sparsity") or {}
    inline = OmegaConf.to_container(inline) if OmegaConf.is_config(inline) else dict(inline)
    return {**_layer_amounts_file(cfg), **{str(k): float(v) for k, v in inline.items()}}


def _layer_amounts_file(cfg) -> dict[str, float]:
    value = cfg.get("layer_amounts")
    if not value:
        return {}
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pruning.layer_amounts={value}: no such file")
        amounts = OmegaConf.to_container(OmegaConf.load(path))
    else:
        amounts = OmegaConf.to_container(value) if OmegaConf.is_config(value) else dict(value)
    if not isinstance(amounts, dict) or not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in amounts.values()):
        raise ValueError(f"pruning.layer_amounts={value}: must map layer names to fractions in [0, 1)")
    return {str(k): float(v) for k, v in amounts.items()}
