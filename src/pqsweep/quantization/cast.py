"""Float precisions: fp32 as it is, and fp16 / bf16 weights and activations behind a float32 interface."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pqsweep.weights import CastInputs

def fp32(model: nn.Module, cfg, ctx) -> nn.Module:
    """No quantization: the float32 model as it is."""
    return model.cpu().eval()


def fp16(model: nn.Module, cfg, ctx) -> nn.Module:
    """Weights and activations in IEEE half precision (stored and run as fp16)."""
    return CastInputs(copy.deepcopy(model).cpu().eval(), torch.float16).eval()


def bf16(model: nn.Module, cfg, ctx) -> nn.Module:
    """Weights and activations in bfloat16: fp32's 8-bit exponent (no overflow) with an 8-bit mantissa."""
    return CastInputs(copy.deepcopy(model).cpu().eval(), torch.bfloat16).eval()
