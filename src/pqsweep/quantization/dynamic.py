"""Post-training dynamic int8 in torch.ao's eager mode: int8 Linear weights, activations quantized on the fly."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pqsweep.quantization.engine import quiet_deprecations, set_engine


def dynamic_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """Post-training dynamic quantization: int8 Linear weights, activations quantized on the fly.

    Only nn.Linear has dynamic int8 kernels; convolutions stay float32 (so a conv net shrinks little).
    """
    set_engine(cfg.engine)
    with quiet_deprecations():
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)
