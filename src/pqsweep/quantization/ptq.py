"""Steps on the float model before static int8 (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019): cross-layer equalization and bias correction, each an option of static_int8.

- `equalize`: BatchNorm folded into its conv, then torch.ao's `_equalize.equalize` over every pair of Conv2d / Linear
  layers that follow each other through nothing but positively scale-equivariant ops (ReLU, max-pooling, dropout in
  eval): it rescales each channel so the first layer's output ranges match the second's input ranges, which leaves
  the float function unchanged and per-tensor int8 grids fit every channel better. The pairs are found by tracing
  the model (torch.fx), so a residual add, a concatenation or a flatten ends a chain.
- `bias_correction`: the mean error int8 weight rounding adds to each output channel, measured on the calibration
  batches (the layer's output with its weights rounded as the int8 observer will round them, minus its float output),
  subtracted from the layer's bias: Nagel et al.'s empirical bias correction, for the weight term. The weight grid is
  the one `static_qconfig` gives the converter, so the correction is for the rounding the int8 model will have.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from pqsweep.console import plural
from pqsweep.quantization.adaround import layer_function
from pqsweep.quantization.fake_quant import layer_inputs

log = logging.getLogger(__name__)

LAYERS = (nn.Conv2d, nn.Linear)
# between two layers, these keep a positive per-channel scale: f(s x) = s f(x) for s > 0
EQUIVARIANT_MODULES = (nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity)
EQUIVARIANT_FUNCTIONS = (torch.relu, nn.functional.relu)


def folded(model: nn.Module) -> fx.GraphModule:
    """BatchNorm folded into the Conv2d before it (a GraphModule; eval mode)."""
    return fuse(copy.deepcopy(model).cpu().eval(), inplace=True)


def _plain(module: nn.Module) -> bool:
    return isinstance(module, LAYERS) and getattr(module, "groups", 1) == 1


def equalizable_pairs(graph: fx.GraphModule) -> list[list[str]]:
    """[first, second] names of the layers whose outputs reach exactly one next layer through equivariant ops only,
    the channels matching (first's outputs are second's inputs)."""
    modules = dict(graph.named_modules())
    pairs = []
    for node in graph.graph.nodes:
        if node.op != "call_module" or not _plain(modules[node.target]):
            continue
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if user.op == "call_module" and _plain(modules[user.target]):
                first, second = modules[node.target], modules[user.target]
                outs = first.out_channels if isinstance(first, nn.Conv2d) else first.out_features
                ins = second.in_channels if isinstance(second, nn.Conv2d) else second.in_features
                if outs == ins:
                    pairs.append([node.target, user.target])
                break
            equivariant = (user.op == "call_module" and isinstance(modules[user.target], EQUIVARIANT_MODULES)) or \
                (user.op == "call_function" and user.target in EQUIVARIANT_FUNCTIONS)
            if not equivariant:
                break
            current = user
    return pairs


def equalize(model: fx.GraphModule) -> list[list[str]]:
    """Cross-layer equalization in place; returns the pairs it equalized."""
    from torch.ao.quantization._equalize import equalize as torch_equalize

    pairs = equalizable_pairs(model)
    if pairs:
        torch_equalize(model, pairs, threshold=1e-4, inplace=True)
    log.info("equalize: %s of layers: %s", plural(len(pairs), "pair"), ", ".join("+".join(p) for p in pairs) or "none")
    return pairs


@torch.no_grad()
def correct_biases(model: nn.Module, weight_observer, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each Conv2d / Linear's bias minus the mean output error of its int8-rounded weights on `batches`, in place
    (a bias is added where a layer had none). Returns {layer: the correction subtracted, per output channel}."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYERS)]
    corrections = {}
    for (name, layer), inputs in zip(layers, layer_inputs(model, [m for _, m in layers], batches)):
        observer = weight_observer()
        observer(layer.weight)
        scale, zero_point = observer.calculate_qparams()
        rounded = _fake_quantize(layer.weight, scale, zero_point, observer)
        forward = layer_function(layer)
        error = forward(inputs, rounded) - forward(inputs, layer.weight)
        shift = error.mean([d for d in range(error.dim()) if d != 1])
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.bias -= shift
        corrections[name] = shift
    return corrections


def _fake_quantize(weight: torch.Tensor, scale, zero_point, observer) -> torch.Tensor:
    if observer.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point.int(), observer.ch_axis,
                                                      observer.quant_min, observer.quant_max)
    return torch.fake_quantize_per_tensor_affine(weight, float(scale), int(zero_point), observer.quant_min,
                                                 observer.quant_max)
