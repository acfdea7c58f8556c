"""Weight-only int8 (W8A32): Conv2d and Linear weights stored as int8 with one scale per output channel, activations
and arithmetic in float32. Smaller files at float accuracy; no faster, since each call dequantizes its weights."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class Int8Weights(nn.Module):
    """A Conv2d or Linear whose weight is stored as int8 (`weight`) times a float32 scale per output channel."""

    def __init__(self, layer: nn.Conv2d | nn.Linear):
        super().__init__()
        weight = layer.weight.detach().float()
        scale = weight.flatten(1).abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("weight", torch.round(weight / scale.view(shape)).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.conv = {k: getattr(layer, k) for k in ("stride", "padding", "dilation", "groups")} \
            if isinstance(layer, nn.Conv2d) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() * self.weight_scale.view((-1,) + (1,) * (self.weight.dim() - 1))
        if self.conv is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, **self.conv)


def weight_only_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """Every Conv2d and Linear of a copy of `model` replaced by its Int8Weights form (symmetric, per channel:
    a pruned weight stays exactly zero)."""
    model = copy.deepcopy(model).cpu().eval()
    for name, layer in list(model.named_modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and type(layer).__module__.startswith("torch.nn"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Int8Weights(layer))
    return model
