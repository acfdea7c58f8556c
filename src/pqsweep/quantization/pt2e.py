"""Static int8 through torchao's PT2E flow (torch.export + X86InductorQuantizer), stored as int8, run on oneDNN.

`static_int8_pt2e` (option `static_int8` with `quantization.backend=pt2e`) does:
1. `torch.export.export(model, (x,), dynamic_shapes={batch}, strict=True).module()`: non-strict export fails on
   ResNet-18 in prepare_pt2e ("Input partition has more than one output node"); the batch dimension stays dynamic.
2. prepare_pt2e with X86InductorQuantizer (uint8 activations per tensor, HistogramObserver; int8 weights symmetric,
   per channel, or per tensor with `granularity=per_tensor`, which the default config lacks so we build it), runs
   the first `calibration_batches` training batches, convert_pt2e (BatchNorm is folded into the convs there).
3. What convert_pt2e leaves is a *reference* graph: int8 weights (constant-folded into `_frozen_param*` buffers)
   feeding dequantize -> fp32 conv/linear, with quantize/dequantize around every activation. It also leaves every
   original fp32 weight as an unused attribute (its state_dict is 1.25x the fp32 file) and the activation scales
   as literals in the graph code. We move each int8 weight to `<layer>.weight` (with `weight_scale`,
   `weight_zero_point`), the activation qparams to buffers, and delete what the graph no longer reads, so
   `torch.save(model.state_dict())` holds int8 weights and all it needs to reload, and measure's per-layer
   `.weight` counts see them.
4. The reference graph computes in fp32 on dequantized values and is slow (ResNet-18 at 32 px, batch 1, one
   thread, shared 2-core machine: 110-140 ms vs 26 ms fp32). We lower it as torchao's `lower_pt2e_quantized_to_x86`
   does (re-export, Inductor's freezing pattern passes, constant folding), but keeping the batch dimension dynamic:
   the graph then calls oneDNN int8 kernels (onednn.qconv_pointwise, qconv2d_pointwise.binary for conv+add,
   qlinear_pointwise) on prepacked weights: 9 ms (FX static_int8: 7.6 ms). Per-tensor weights are written as
   per-channel ones with a repeated scale for this, the only form the weight-prepack pattern matches. No C++
   compiler is involved. torch.compile (Inductor, freezing) on the reference graph also works here (g++ present) but
   took 119 s to compile ResNet-18, ran at 25 ms (no faster than fp32 eager) and recompiled 22 s for a new batch
   size, so we do not use it.

The returned `Int8Pt2e` takes float32 input of any batch size and returns float32 logits. Its state_dict is the
reference graph's (int8 weights, fp32 scales, int64 zero-points, fp32 biases); the lowered graph is kept outside
the module tree, because its packed oneDNN weights are opaque tensors that torch.save cannot write. After changing
the stored weights (e.g. pruning them in the integer domain), call `relower()`; `load_state_dict`, copy.deepcopy
and unpickling do it themselves. Lowering relies on torch._inductor's freezing passes, a private API that
torchao's own lowering calls too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from itertools import islice

import torch
from torch import fx, nn
from torch.export import Dim

# Dequantize ops whose int8 input is a layer's weight, per granularity (registered when torchao's pt2e is imported).
_WEIGHT_DEQUANT = ("quantized_decomposed.dequantize_per_channel.default",
                   "quantized_decomposed.dequantize_per_tensor.default")


def static_int8_pt2e(model: nn.Module, cfg, ctx) -> nn.Module:
    """Post-training static int8 through PT2E, calibrated on cfg.calibration_batches training batches."""
    with _quiet_torchao_import():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    batches = [x.cpu() for x, _ in islice(ctx.loaders["train"], cfg.calibration_batches)]
    if not batches:
        raise ValueError("quantization.calibration_batches: the training loader gave no batches to calibrate on")
    per_channel = str(getattr(cfg.granularity, "value", cfg.granularity)) == "per_channel"
    float_model = copy.deepcopy(model).cpu().eval()
    graph = _export(float_model, batches[0])
    prepared = prepare_pt2e(graph, X86InductorQuantizer().set_global(_quantization_config(per_channel)))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    reference = convert_pt2e(prepared)
    _store_int8_weights(reference)
    _store_activation_qparams(reference)
    return Int8Pt2e(reference, batches[0][:2])  # batch 2: export would specialise a batch of 1


class Int8Pt2e(nn.Module):
    """Stores the int8 reference graph (`reference`, in the state_dict); runs its oneDNN lowering."""

    def __init__(self, reference: fx.GraphModule, example: torch.Tensor):
        super().__init__()
        self.reference = reference
        self.example = example  # a plain attribute: lowering re-exports with it
        self.relower()
        self.register_load_state_dict_post_hook(lambda module, keys: module.relower())

    def relower(self) -> None:
        """Rebuilds the oneDNN graph from the stored int8 weights (after they were changed)."""
        # Set through __dict__ so it is no submodule: its packed weights are opaque and must not reach state_dict.
        self.__dict__["lowered"] = _lower(self.reference, self.example)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowered(x)

    def exportable(self) -> fx.GraphModule:
        """A copy of the int8 graph in the form it is lowered from (literal activation scales): what export writes."""
        return _lowerable(self.reference)

    def train(self, mode: bool = True) -> "Int8Pt2e":
        """Only records the flag: exported graphs refuse train()/eval(), and a converted int8 graph has no
        training behaviour left (BatchNorm folded, no dropout), so evaluation code may call eval() as usual."""
        self.training = mode
        return self

    # copy.deepcopy and pickling cannot copy the opaque packed weights: they copy the rest and lower again.
    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k != "lowered"}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.relower()


@contextlib.contextmanager
def _quiet_torchao_import():
    """Importing torchao 0.18 under torch 2.14 logs (torch.utils._pytree) that registering its KernelPreference enum
    as a pytree constant is deprecated: a note between those two libraries, nothing about this run."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quantization_config(per_channel: bool):
    """The x86 Inductor default (per-channel symmetric int8 weights), or the same with per-tensor weights."""
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import get_default_x86_inductor_quantization_config

    config = get_default_x86_inductor_quantization_config()
    if per_channel:
        return config
    weight = dataclasses.replace(config.weight, qscheme=torch.per_tensor_symmetric, ch_axis=None,
                                 observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return dataclasses.replace(config, weight=weight)


def _export(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """A strict torch.export graph with a dynamic batch dimension (any batch size runs)."""
    return torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch")},), strict=True).module()


def _get(module: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), module)


def _store_int8_weights(graph: fx.GraphModule) -> None:
    """Moves each folded int8 weight to `<layer>.weight`, its scale and zero-point to buffers `weight_scale`,
    `weight_zero_point` (per-tensor ones are graph constants otherwise), and deletes the attributes the converted
    graph no longer reads (the original fp32 weights, BatchNorm parameters)."""
    for node in list(graph.graph.nodes):
        if node.op != "get_attr" or _get(graph, node.target).dtype != torch.int8:
            continue
        dequant = next(iter(node.users))
        layer_node = next(iter(dequant.users))
        if str(dequant.target) not in _WEIGHT_DEQUANT or "nn_module_stack" not in layer_node.meta:
            continue
        path = list(layer_node.meta["nn_module_stack"].values())[-1][0]
        layer = graph.get_submodule(path)
        scale, zero_point = dequant.args[1:3]
        if not isinstance(scale, fx.Node):  # per tensor: a float and an int in the graph code
            layer.register_buffer("weight_scale", torch.tensor(scale, dtype=torch.float32))
            layer.register_buffer("weight_zero_point", torch.tensor(zero_point, dtype=torch.int64))
            with graph.graph.inserting_before(dequant):
                scale, zero_point = (graph.graph.get_attr(f"{path}.{name}")
                                     for name in ("weight_scale", "weight_zero_point"))
            dequant.args = (node, scale, zero_point, *dequant.args[3:])
            dequant.target = torch.ops.quantized_decomposed.dequantize_per_tensor.tensor
        for suffix, attr in zip(("weight", "weight_scale", "weight_zero_point"), (node, scale, zero_point)):
            tensor = _get(graph, attr.target)
            if hasattr(layer, suffix) and attr.target != f"{path}.{suffix}":
                delattr(layer, suffix)  # the fp32 original
            layer.register_buffer(suffix, tensor)
            attr.target = f"{path}.{suffix}"
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph.named_parameters()) + list(graph.named_buffers()):
        if name not in used:
            parent, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(parent), attr)
    graph.recompile()


def _store_activation_qparams(graph: fx.GraphModule) -> None:
    """Turns each activation's scale and zero-point (float and int literals in the graph code, out of reach of
    state_dict) into buffers `activation<i>_scale`, `activation<i>_zero_point` read by the `.tensor` overloads."""
    quantize, dequantize = torch.ops.quantized_decomposed.quantize_per_tensor, \
        torch.ops.quantized_decomposed.dequantize_per_tensor
    count = 0
    for node in list(graph.graph.nodes):
        if node.target != quantize.default:
            continue
        name = f"activation{count}"
        count += 1
        graph.register_buffer(f"{name}_scale", torch.tensor(node.args[1], dtype=torch.float32))
        graph.register_buffer(f"{name}_zero_point", torch.tensor(node.args[2], dtype=torch.int64))
        with graph.graph.inserting_before(node):
            scale, zero_point = graph.graph.get_attr(f"{name}_scale"), graph.graph.get_attr(f"{name}_zero_point")
        for user in [node, *(u for u in node.users if u.target == dequantize.default)]:
            user.args = (user.args[0], scale, zero_point, *user.args[3:])
            user.target = quantize.tensor if user is node else dequantize.tensor
    graph.recompile()


def _literal_activation_qparams(graph: fx.GraphModule) -> None:
    """The inverse of _store_activation_qparams (in place, on the lowering's copy): Inductor's patterns match
    activation quantize/dequantize with literal scales."""
    overloads = {torch.ops.quantized_decomposed.quantize_per_tensor.tensor:
                 torch.ops.quantized_decomposed.quantize_per_tensor.default,
                 torch.ops.quantized_decomposed.dequantize_per_tensor.tensor:
                 torch.ops.quantized_decomposed.dequantize_per_tensor.default}
    for node in graph.graph.nodes:
        if node.target in overloads:
            scale, zero_point = (_get(graph, arg.target) for arg in node.args[1:3])
            node.args = (node.args[0], float(scale), int(zero_point), *node.args[3:])
            node.target = overloads[node.target]
    graph.graph.eliminate_dead_code()
    graph.recompile()


def _lowerable(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy in the form Inductor's patterns match: per-tensor weights written as per-channel ones with one scale
    repeated (the same numbers; weight prepack matches only dequantize_per_channel), literal activation qparams."""
    graph = copy.deepcopy(graph)
    for dequant in list(graph.graph.nodes):
        if dequant.target != torch.ops.quantized_decomposed.dequantize_per_tensor.tensor:
            continue
        weight, scale, zero_point = dequant.args[:3]
        if weight.op != "get_attr" or _get(graph, weight.target).dtype != torch.int8:
            continue
        channels = _get(graph, weight.target).shape[0]
        path = weight.target.rpartition(".")[0]
        layer = graph.get_submodule(path)
        layer.register_buffer("weight_scales", _get(graph, scale.target).expand(channels).clone())
        layer.register_buffer("weight_zero_points", _get(graph, zero_point.target).expand(channels).clone())
        with graph.graph.inserting_before(dequant):
            scales, zero_points = (graph.graph.get_attr(f"{path}.{name}")
                                   for name in ("weight_scales", "weight_zero_points"))
        dequant.args = (weight, scales, zero_points, 0, *dequant.args[3:])
        dequant.target = torch.ops.quantized_decomposed.dequantize_per_channel.default
    _literal_activation_qparams(graph)
    return graph


def _lower(reference: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """torchao.quantization.pt2e.lowering.lower_pt2e_quantized_to_x86, with a dynamic batch dimension."""
    from torch._export.utils import _is_cia_op
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    # Decompose only composite-implicit ops (post-autograd), keeping the q/dq patterns the passes match.
    table = {op: fn for op, fn in torch.export.default_decompositions().items() if _is_cia_op(op)}
    exported = torch.export.export(_lowerable(reference), (example,), dynamic_shapes=({0: Dim("batch")},), strict=True)
    lowered = exported.run_decompositions(table).module()
    for node in list(lowered.graph.nodes):  # the qlinear pattern expects permute where export writes aten.t
        if node.target == torch.ops.aten.t.default:
            with lowered.graph.inserting_before(node):
                permute = lowered.graph.call_function(torch.ops.aten.permute.default, (node.args[0], [1, 0]))
            node.replace_all_uses_with(permute)
            lowered.graph.erase_node(node)
    lowered.recompile()
    with torch.no_grad():
        freezing_passes(lowered, (example,))
        constant_fold(lowered)
    # oneDNN convolutions return channels-last tensors, which a flatten's `view` cannot reshape (Inductor would
    # re-layout them when compiling; eager does not): reshape is the same op, copying only when it must.
    for node in lowered.graph.nodes:
        if node.target == torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    lowered.recompile()
    return lowered
