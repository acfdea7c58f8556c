"""int8 through torch.ao FX graph mode: static post-training quantization, and the calibration and conversion QAT and
mixed share.

Every quantizer is `fn(model, cfg, ctx) -> nn.Module`: a CPU model that takes float32 inputs and returns float32
logits, so evaluation and latency code need not know how it computes inside; static methods calibrate on
`ctx.loaders["train"]`. torch.ao.quantization is deprecated in favour of torchao but is the flow that converts
every torchvision model here to real int8 kernels on CPU (pqsweep.quantization.engine quiets its warnings).
"""

from __future__ import annotations

import copy
from itertools import islice

import torch
from torch import nn

from pqsweep.quantization.engine import option_value, quiet_deprecations, set_engine


def static_int8_fx(model: nn.Module, cfg, ctx) -> nn.Module:
    """torch.ao FX: fused Conv-BN-ReLU, per-channel or per-tensor weights (`granularity`)."""
    set_engine(cfg.engine)
    with quiet_deprecations():
        return calibrate_and_convert(model, static_mapping(cfg), cfg, ctx)


def static_qconfig(cfg):
    """The engine's activation observer with the weight granularity asked for: engines differ in their defaults
    (x86/fbgemm per-channel, qnnpack per-tensor), the config does not."""
    from torch.ao.quantization import QConfig, get_default_qconfig
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    if cfg.granularity == "per_channel":
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=get_default_qconfig(option_value(cfg.engine)).activation, weight=weight)


def static_mapping(cfg):
    """The engine's own mapping (fixed-qparams ops such as sigmoid keep theirs) with `static_qconfig` as global."""
    from torch.ao.quantization import get_default_qconfig_mapping

    return get_default_qconfig_mapping(option_value(cfg.engine)).set_global(static_qconfig(cfg))


def calibration_batches(cfg, ctx) -> list[torch.Tensor]:
    return [x.cpu() for x, _ in islice(ctx.loaders["train"], cfg.calibration_batches)]


def calibrate_and_convert(model: nn.Module, mapping, cfg, ctx) -> nn.Module:
    """prepare_fx (fuses Conv-BN-ReLU, inserts observers), run the calibration batches, convert to int8."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = calibration_batches(cfg, ctx)
    prepared = prepare_fx(copy.deepcopy(model).cpu().eval(), mapping, example_inputs=(batches[0][:1],))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return contiguous_before_mean(convert_fx(prepared)).eval()


def contiguous_before_mean(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Copy the input of every `mean` to the standard layout first. ShuffleNetV2 ends in `x.mean([2, 3])`; at 32 px
    its int8 input is N x C x 1 x 1 and channels_last, a layout torch's quantized mean (x86, fbgemm) mistakes for
    one it must keep, failing with "required rank 4 tensor to use channels_last format". The copy is C bytes a
    sample; `contiguous()` would not do, since such a tensor counts as contiguous in both layouts."""
    for node in list(graph.graph.nodes):
        if (node.op, node.target) in (("call_method", "mean"), ("call_function", torch.mean)):
            with graph.graph.inserting_before(node):
                copy_ = graph.graph.call_method("clone", (node.args[0],), {"memory_format": torch.contiguous_format})
            node.replace_input_with(node.args[0], copy_)
    graph.recompile()
    return graph
