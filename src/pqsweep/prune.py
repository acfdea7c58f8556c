"""Pruning methods. Each is `fn(model, cfg, ctx) -> model`: it prunes, folds the masks in (permanent) and returns
the pruned model. A multi-stage method may call `ctx.finetune(model)` between its stages; the pipeline fine-tunes
after the last one.

Prunable weights are the weight tensors of every Conv2d and Linear layer, classifier included, as in ShrinkBench;
biases and BatchNorm parameters are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn.utils.prune as torch_prune
from omegaconf import OmegaConf
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            yield name, module


def no_pruning(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """The dense baseline: keep every weight."""
    return model


def global_magnitude(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """Unstructured L1-magnitude pruning ranked over all prunable layers together (Han et al.)."""
    if cfg.amount == 0:
        return model
    params = [(module, "weight") for _, module in prunable_layers(model)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=float(cfg.amount))
    _fold_masks(model)
    return model


def layer_magnitude(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """Unstructured L1-magnitude pruning of the same fraction in every prunable layer."""
    if cfg.amount == 0:
        return model
    for _, module in prunable_layers(model):
        torch_prune.l1_unstructured(module, "weight", amount=float(cfg.amount))
    _fold_masks(model)
    return model


def read_layer_amounts(cfg) -> dict[str, float]:
    """`pruning.layer_amounts`: a YAML file {layer name: amount} (pqsweep-sensitivity writes one), or {} if unset."""
    if not cfg.get("layer_amounts"):
        return {}
    path = Path(cfg.layer_amounts).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pruning.layer_amounts={cfg.layer_amounts}: no such file")
    amounts = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(amounts, dict) or not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in amounts.values()):
        raise ValueError(f"pruning.layer_amounts={cfg.layer_amounts}: must map layer names to fractions in [0, 1)")
    return {str(k): float(v) for k, v in amounts.items()}


def footprint(model: nn.Module) -> tuple[int, int]:
    """(prunable weights, of which zero): tells whether a pruner changed anything."""
    weights = [module.weight for _, module in prunable_layers(model)]
    return sum(w.numel() for w in weights), sum(int((w == 0).sum()) for w in weights)


def _fold_masks(model: nn.Module) -> None:
    """Make the zeros part of the weights, so what is saved and measured is the pruned model itself."""
    for _, module in prunable_layers(model):
        if torch_prune.is_pruned(module):
            torch_prune.remove(module, "weight")


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each prunable weight is zero now; fine-tuning re-applies these so pruned weights stay pruned."""
    return {name: module.weight.detach() == 0 for name, module in prunable_layers(model)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, module in prunable_layers(model):
            if name in masks and masks[name].any():
                module.weight.masked_fill_(masks[name], 0.0)
