"""Quantization methods. Each is `fn(model, cfg, ctx) -> nn.Module`, a CPU model that runs as deployed; static
methods calibrate on `ctx.loaders["train"]`.

The returned model takes float32 inputs and returns float32 logits, so evaluation and latency code need not know
how it computes inside. int8 options use torch.ao.quantization (FX graph mode) by default; it is deprecated in favour
of torchao but is the flow that converts every torchvision model here to real int8 kernels on CPU. `static_int8` with
`backend: pt2e` hands over to torchao's PT2E flow (pqsweep.pt2e). Only this file knows which backend does the work.
"""

from __future__ import annotations

import copy
import warnings
from itertools import islice

import torch
from torch import nn

from pqsweep.prune import prunable_layers


class CastInputs(nn.Module):
    """Runs `inner` in `dtype` (fp16/bf16 weights) behind a float32 interface."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


def fp32(model: nn.Module, cfg, ctx) -> nn.Module:
    """No quantization: the float32 model as it is."""
    return model.cpu().eval()


def fp16(model: nn.Module, cfg, ctx) -> nn.Module:
    """Weights and activations in IEEE half precision (stored and run as fp16)."""
    return CastInputs(copy.deepcopy(model).cpu().eval(), torch.float16).eval()


def bf16(model: nn.Module, cfg, ctx) -> nn.Module:
    """Weights and activations in bfloat16: fp32's 8-bit exponent (no overflow) with an 8-bit mantissa."""
    return CastInputs(copy.deepcopy(model).cpu().eval(), torch.bfloat16).eval()


def dynamic_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """Post-training dynamic quantization: int8 Linear weights, activations quantized on the fly.

    Only nn.Linear has dynamic int8 kernels; convolutions stay float32 (so a conv net shrinks little).
    """
    _set_engine(cfg.engine)
    with _quiet_deprecations():
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def static_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """Post-training static quantization: int8 weights and activations, observers calibrated on
    `cfg.calibration_batches` training batches, by torch.ao FX or torchao PT2E (`cfg.backend`)."""
    backend = _value(cfg.get("backend") or "fx")
    if backend not in _STATIC_BACKENDS:
        raise ValueError(f"quantization.backend={backend} is not allowed: must be one of {', '.join(_STATIC_BACKENDS)}")
    return _STATIC_BACKENDS[backend](model, cfg, ctx)


def _static_fx(model: nn.Module, cfg, ctx) -> nn.Module:
    """torch.ao FX: fused Conv-BN-ReLU, per-channel or per-tensor weights (`granularity`)."""
    _set_engine(cfg.engine)
    with _quiet_deprecations():
        return _calibrate_and_convert(model, _static_mapping(cfg), cfg, ctx)


def _static_pt2e(model: nn.Module, cfg, ctx) -> nn.Module:
    # Imported here: torchao is slow to import and only pt2e runs need it.
    from pqsweep.pt2e import static_int8_pt2e

    return static_int8_pt2e(model, cfg, ctx)


_STATIC_BACKENDS = {"fx": _static_fx, "pt2e": _static_pt2e}


def qat_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """Quantization-aware fine-tuning: fake-quant weights and activations for `cfg.qat_epochs` epochs at
    `cfg.qat_lr`, then conversion to a real int8 model (torch.ao FX).

    Fine-tuning goes through `ctx.finetune`, which holds every weight that is zero now at zero, so a pruned model
    stays pruned: the fused QAT modules (ConvBn2d, LinearReLU, ...) subclass nn.Conv2d / nn.Linear, their `weight`
    is the conv's own, and folding BN into it and symmetric int8 rounding both keep a zero a zero.
    """
    _require_fx(cfg, "qat_int8")
    _set_engine(cfg.engine)
    with _quiet_deprecations():
        from torch.ao.quantization import QConfig, get_default_qat_qconfig, get_default_qat_qconfig_mapping
        from torch.ao.quantization.fake_quantize import (
            default_fused_per_channel_wt_fake_quant,
            default_fused_wt_fake_quant,
        )
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

        engine = _value(cfg.engine)
        weight = default_fused_per_channel_wt_fake_quant if cfg.granularity == "per_channel" \
            else default_fused_wt_fake_quant
        qconfig = QConfig(activation=get_default_qat_qconfig(engine).activation, weight=weight)
        mapping = get_default_qat_qconfig_mapping(engine).set_global(qconfig)
        batches = _calibration_batches(cfg, ctx)
        prepared = prepare_qat_fx(copy.deepcopy(model).cpu().train(), mapping, example_inputs=(batches[0][:1],))
        # Start the fake-quant ranges from the calibration batches (eval mode: BN statistics untouched), so the
        # first QAT steps see the data's ranges and qat_epochs=0 still converts with calibrated scales.
        prepared.eval()
        with torch.no_grad():
            for x in batches:
                prepared(x)
        ctx.finetune(prepared, epochs=cfg.qat_epochs, lr=cfg.qat_lr, desc="qat")
        return _contiguous_before_mean(convert_fx(prepared.cpu().eval())).eval()


def mixed(model: nn.Module, cfg, ctx) -> nn.Module:
    """Per-layer precision: static int8 (FX) everywhere except the layers `cfg.layers` maps to fp32, which stay
    float32 with (de)quantization around them. `head` names the model's last nn.Linear (001: FP32 classifier)."""
    _require_fx(cfg, "mixed")
    _set_engine(cfg.engine)
    layers = _resolve_layers(model, dict(cfg.layers or {}))
    with _quiet_deprecations():
        mapping, qconfig = _static_mapping(cfg), _static_qconfig(cfg)
        for name, precision in layers.items():
            # an explicit int8 entry matters when it sits inside a module mapped to fp32 (longest name wins)
            mapping.set_module_name(name, None if precision == "fp32" else qconfig)
        return _calibrate_and_convert(model, mapping, cfg, ctx)


def _resolve_layers(model: nn.Module, layers: dict) -> dict[str, str]:
    """{module name: precision} with `head` replaced by the last nn.Linear; one-line errors for unknown names."""
    # A module names a precision only if a Conv/Linear lies in it: a BatchNorm or ReLU fuses into the conv
    # before it and takes that conv's precision, so naming one alone would be silently ignored.
    layer_names = [name for name, _ in prunable_layers(model)]
    modules = {name for name in dict(model.named_modules()) if name and
               any(layer == name or layer.startswith(name + ".") for layer in layer_names)}
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    resolved = {}
    for name, precision in layers.items():
        name = str(name)
        if precision not in ("fp32", "int8"):
            raise ValueError(f"quantization.layers.{name}={precision} is not allowed: must be fp32 or int8")
        if name == "head":
            if not linears:
                raise ValueError("quantization.layers.head: the model has no nn.Linear layer to call its head")
            name = linears[-1]
        elif name not in modules:
            raise ValueError(f"quantization.layers.{name}: no Conv/Linear layer of that name or inside a module of "
                             f"that name; layer names: {', '.join(['head'] + layer_names)} (or a module holding some)")
        resolved[name] = precision
    return resolved


def _static_qconfig(cfg):
    """The engine's activation observer with the weight granularity asked for: engines differ in their defaults
    (x86/fbgemm per-channel, qnnpack per-tensor), the config does not."""
    from torch.ao.quantization import QConfig, get_default_qconfig
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    if cfg.granularity == "per_channel":
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=get_default_qconfig(_value(cfg.engine)).activation, weight=weight)


def _static_mapping(cfg):
    """The engine's own mapping (fixed-qparams ops such as sigmoid keep theirs) with `_static_qconfig` as global."""
    from torch.ao.quantization import get_default_qconfig_mapping

    return get_default_qconfig_mapping(_value(cfg.engine)).set_global(_static_qconfig(cfg))



def _calibration_batches(cfg, ctx) -> list[torch.Tensor]:
    return [x.cpu() for x, _ in islice(ctx.loaders["train"], cfg.calibration_batches)]


def _calibrate_and_convert(model: nn.Module, mapping, cfg, ctx) -> nn.Module:
    """prepare_fx (fuses Conv-BN-ReLU, inserts observers), run the calibration batches, convert to int8."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = _calibration_batches(cfg, ctx)
    prepared = prepare_fx(copy.deepcopy(model).cpu().eval(), mapping, example_inputs=(batches[0][:1],))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return _contiguous_before_mean(convert_fx(prepared)).eval()


def _contiguous_before_mean(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
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


def _require_fx(cfg, method: str) -> None:
    """Only static_int8 has a PT2E path; refuse rather than silently run FX when pt2e is asked for."""
    backend = _value(cfg.get("backend") or "fx")
    if backend != "fx":
        raise ValueError(f"quantization.backend={backend} is not allowed with {method}: must be fx")


def _value(option) -> str:
    """An enum member's value or a plain string (configs built with OmegaConf.create hold strings)."""
    return option.value if hasattr(option, "value") else str(option)


def _set_engine(engine) -> None:
    name = _value(engine)
    if name not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"quantization.engine={name}: not supported by this torch build "
            f"(supported: {', '.join(e for e in torch.backends.quantized.supported_engines if e != 'none')})"
        )
    torch.backends.quantized.engine = name


class _quiet_deprecations(warnings.catch_warnings):
    """torch.ao.quantization warns on import and use that it is deprecated; we know, and say so above."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*are deprecated.*")
        return self
