"""Quantization methods. Each is `fn(model, cfg, ctx) -> nn.Module`, a CPU model that runs as deployed; static
methods calibrate on `ctx.loaders["train"]`.

The returned model takes float32 inputs and returns float32 logits, so evaluation and latency code need not know
how it computes inside. int8 options use torch.ao.quantization (FX graph mode); it is deprecated in favour of
torchao but is the flow that converts every torchvision model here to real int8 kernels on CPU (torchao's PT2E
X86InductorQuantizer failed on ResNet-18 in torch 2.14). Only this file knows which backend does the work.
"""

from __future__ import annotations

import copy
import warnings
from itertools import islice

import torch
from torch import nn


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


def dynamic_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """Post-training dynamic quantization: int8 Linear weights, activations quantized on the fly.

    Only nn.Linear has dynamic int8 kernels; convolutions stay float32 (so a conv net shrinks little).
    """
    _set_engine(cfg.engine)
    with _quiet_deprecations():
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def static_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """Post-training static quantization: fused Conv-BN-ReLU, int8 weights and activations, observers calibrated
    on `cfg.calibration_batches` training batches; per-channel or per-tensor weights (`granularity`)."""
    _set_engine(cfg.engine)
    with _quiet_deprecations():
        from torch.ao.quantization import QConfig, get_default_qconfig, get_default_qconfig_mapping
        from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        # The engine's own mapping (activation observers, fixed-qparams ops), with the weight granularity asked
        # for: engines differ in their defaults (x86/fbgemm per-channel, qnnpack per-tensor), the config does not.
        engine = cfg.engine.value
        if cfg.granularity == "per_channel":
            weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        else:
            weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        activation = get_default_qconfig(engine).activation
        mapping = get_default_qconfig_mapping(engine).set_global(QConfig(activation=activation, weight=weight))
        float_model = copy.deepcopy(model).cpu().eval()
        batches = [x.cpu() for x, _ in islice(ctx.loaders["train"], cfg.calibration_batches)]
        prepared = prepare_fx(float_model, mapping, example_inputs=(batches[0][:1],))
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return convert_fx(prepared).eval()


def _set_engine(engine) -> None:
    name = engine.value if hasattr(engine, "value") else str(engine)
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
