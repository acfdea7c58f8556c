"""Weights as the model stores them: the one place that knows float, fp16/bf16, torch.ao int8 and PT2E int8 layouts.

Prunable weights are the weight tensors of every Conv2d and Linear layer, classifier included, as in ShrinkBench;
biases and BatchNorm parameters are kept. `stored_weights` reads and zeroes them in their stored domain: the float
tensors of a float, fp16 or bf16 model (a `CastInputs` wrapper is looked through), and the integers of a torch.ao
(FX) or PT2E int8 model, zeroed to their zero-point with scales and zero-points kept. Masks hold pruned weights at
zero while fine-tuning; `footprint` tells whether a pruner changed anything. This module imports nothing of pqsweep.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)
# torch.ao's quantized Conv2d / Linear; their fused (ConvReLU2d, LinearReLU) and dynamic Linear forms subclass these.
QUANTIZED = (nnq.Conv2d, nnq.Linear)


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The float Conv2d / Linear layers (fine-tuning masks); `stored_weights` also sees quantized ones."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            yield name, module


class CastInputs(nn.Module):
    """Runs `inner` in `dtype` (fp16/bf16 weights) behind a float32 interface."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


@dataclass
class ModuleWeight:
    """One prunable weight as the model stores it: a float tensor, or an int8 tensor with its scales/zero-points."""

    name: str  # the layer's name in the float model (a CastInputs wrapper's `inner.` left out)
    module: nn.Module

    def tensor(self) -> torch.Tensor:
        return self.module.weight() if isinstance(self.module, QUANTIZED) else self.module.weight.detach()

    def magnitude(self) -> torch.Tensor:
        """|value| in float32: for int8, |(q - zero_point) * scale|, so layers with different scales (and the
        channels of a per-channel layer) rank against each other by the value they compute with, not by the
        integer, whose meaning depends on the scale."""
        weight = self.tensor()
        return (weight.dequantize() if weight.is_quantized else weight).float().abs()

    def set_zero(self, mask: torch.Tensor) -> None:
        """Zero the weights where `mask` is True, in their stored domain: the integer becomes the zero-point and
        scales/zero-points are kept, so the result is the same int8 format with exact zeros."""
        if not mask.any():
            return
        if not isinstance(self.module, QUANTIZED):
            with torch.no_grad():
                self.module.weight.masked_fill_(mask, 0)
            return
        weight = self.tensor()
        if not weight.is_quantized:  # dynamic Linear with float16 weights
            self.module.set_weight_bias(weight.masked_fill(mask, 0), self.module.bias())
            return
        ints = weight.int_repr()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            ints = ints.masked_fill(mask, weight.q_zero_point())
            pruned = torch._make_per_tensor_quantized_tensor(ints, weight.q_scale(), weight.q_zero_point())
        elif weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            axis = weight.q_per_channel_axis()
            shape = [-1 if d == axis else 1 for d in range(ints.dim())]
            zero_points = weight.q_per_channel_zero_points().to(ints.dtype).view(shape).expand_as(ints)
            ints = torch.where(mask, zero_points, ints)
            pruned = torch._make_per_channel_quantized_tensor(
                ints, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), axis)
        else:
            raise ValueError(f"layer {self.name}: cannot prune weights with qscheme {weight.qscheme()}")
        self.module.set_weight_bias(pruned, self.module.bias())


@dataclass
class GraphWeight:
    """An int8 weight of a PT2E-converted graph (torchao `convert_pt2e`): an int8 buffer that a dequantize node
    turns into the float weight of a conv or linear, with its scales/zero-points; zeroed in place."""

    name: str  # the float layer it came from (the consuming node's nn_module_stack), else the buffer's name
    ints: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None  # per-channel axis, None for per-tensor

    def _per_element(self, value) -> torch.Tensor:
        value = torch.as_tensor(value)
        if self.axis is None:
            return value
        return value.view([-1 if d == self.axis else 1 for d in range(self.ints.dim())])

    def tensor(self) -> torch.Tensor:
        return self.ints

    def magnitude(self) -> torch.Tensor:
        return ((self.ints.float() - self._per_element(self.zero_point)) * self._per_element(self.scale)).abs()

    def set_zero(self, mask: torch.Tensor) -> None:
        zero = self._per_element(self.zero_point).to(self.ints.dtype).expand_as(self.ints)
        self.ints.copy_(torch.where(mask, zero, self.ints))


def _graph_weights(model: nn.Module) -> list[GraphWeight]:
    graph = getattr(model, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return []

    def value(arg):
        return functools.reduce(getattr, arg.target.split("."), model) if isinstance(arg, torch.fx.Node) else arg

    found = []
    for node in graph.nodes:
        kind = str(node.target)  # e.g. quantized_decomposed.dequantize_per_channel.default
        source = node.args[0] if node.args else None
        if not kind.startswith("quantized_decomposed.dequantize_per_") or getattr(source, "op", None) != "get_attr":
            continue
        ints = value(source)
        if ints.dim() < 2 or ints.is_floating_point():
            continue  # a bias or a float constant, not an integer weight
        stack = [meta for user in node.users for meta in user.meta.get("nn_module_stack", {}).values()]
        name = stack[-1][0] if stack else source.target
        axis = node.args[3] if "per_channel" in kind else None
        found.append(GraphWeight(name, ints, value(node.args[1]), value(node.args[2]), axis))
    return found


StoredWeight = ModuleWeight | GraphWeight


def stored_weights(model: nn.Module) -> list[StoredWeight]:
    """Every prunable weight of a float, fp16/bf16 (quantize.CastInputs), torch.ao int8 or PT2E int8 model."""
    root = model.inner if isinstance(model, CastInputs) else model
    modules = [ModuleWeight(name, module) for name, module in root.named_modules()
               if isinstance(module, PRUNABLE + QUANTIZED)]
    # PT2E graphs may sit inside a wrapper (pqsweep.pt2e.Int8Pt2e keeps its int8 graph as `reference`)
    return modules + [w for module in root.modules() for w in _graph_weights(module)]


def relowered(model: nn.Module) -> nn.Module:
    """After stored weights changed: a model that runs a lowered copy of its weights (PT2E) rebuilds it."""
    if callable(getattr(model, "relower", None)):
        model.relower()
    return model


def footprint(model: nn.Module) -> tuple[int, int]:
    """(prunable weights, of which zero), as stored: tells whether a pruner changed anything."""
    magnitudes = [w.magnitude() for w in stored_weights(model)]
    return sum(m.numel() for m in magnitudes), sum(int((m == 0).sum()) for m in magnitudes)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each prunable weight is zero now; fine-tuning re-applies these so pruned weights stay pruned."""
    return {name: module.weight.detach() == 0 for name, module in prunable_layers(model)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, module in prunable_layers(model):
            if name in masks and masks[name].any():
                module.weight.masked_fill_(masks[name], 0.0)


# -- layer shapes, for a structurally pruned model stored as tensors and numbers only (the prune stage cache) ------

SHAPED = {nn.Conv2d: ("in_channels", "out_channels", "groups"), nn.Linear: ("in_features", "out_features"),
          nn.BatchNorm2d: ("num_features",), nn.BatchNorm1d: ("num_features",)}


def structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """The shape-defining attributes of every Conv2d, Linear and BatchNorm layer."""
    return {name: {attr: getattr(module, attr) for attr in SHAPED[type(module)]}
            for name, module in model.named_modules() if type(module) in SHAPED}


def restore_structure(model: nn.Module, shapes: dict[str, dict[str, int]], state: dict[str, torch.Tensor]) -> None:
    """Give `model`'s layers the shapes in `shapes` and empty tensors shaped as `state`'s, ready to load `state`."""
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        module = modules[name]
        for attr, value in attrs.items():
            setattr(module, attr, value)
        for kind in ("parameters", "buffers"):
            for leaf, tensor in list(getattr(module, f"named_{kind}")(recurse=False)):
                saved = state[f"{name}.{leaf}" if name else leaf]
                if tensor is not None and saved.dim() != tensor.dim():
                    raise RuntimeError(f"{name}.{leaf}: {saved.dim()}-d in the entry, {tensor.dim()}-d in the model")
                if tensor is not None and tensor.shape != saved.shape:
                    replacement = torch.empty_like(saved, dtype=tensor.dtype)
                    if kind == "parameters":
                        setattr(module, leaf, nn.Parameter(replacement, requires_grad=tensor.requires_grad))
                    else:
                        module.register_buffer(leaf, replacement)
