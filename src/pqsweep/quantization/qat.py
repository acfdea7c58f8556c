"""Quantization-aware training (torch.ao FX): fake-quant fine-tuning that keeps pruned weights at zero, then int8."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pqsweep.quantization.engine import option_value, quiet_deprecations, set_engine
from pqsweep.quantization.fx import calibration_batches, contiguous_before_mean

def qat_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """Quantization-aware fine-tuning: fake-quant weights and activations for `cfg.qat_epochs` epochs at
    `cfg.qat_lr`, then conversion to a real int8 model (torch.ao FX).

    Fine-tuning goes through `ctx.finetune`, which holds every weight that is zero now at zero, so a pruned model
    stays pruned: the fused QAT modules (ConvBn2d, LinearReLU, ...) subclass nn.Conv2d / nn.Linear, their `weight`
    is the conv's own, and folding BN into it and symmetric int8 rounding both keep a zero a zero.
    """
    set_engine(cfg.engine)
    with quiet_deprecations():
        from torch.ao.quantization import QConfig, get_default_qat_qconfig, get_default_qat_qconfig_mapping
        from torch.ao.quantization.fake_quantize import (
            default_fused_per_channel_wt_fake_quant,
            default_fused_wt_fake_quant,
        )
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

        engine = option_value(cfg.engine)
        weight = default_fused_per_channel_wt_fake_quant if cfg.granularity == "per_channel" \
            else default_fused_wt_fake_quant
        qconfig = QConfig(activation=get_default_qat_qconfig(engine).activation, weight=weight)
        mapping = get_default_qat_qconfig_mapping(engine).set_global(qconfig)
        batches = calibration_batches(cfg, ctx)
        prepared = prepare_qat_fx(copy.deepcopy(model).cpu().train(), mapping, example_inputs=(batches[0][:1],))
        # Start the fake-quant ranges from the calibration batches (eval mode: BN statistics untouched), so the
        # first QAT steps see the data's ranges and qat_epochs=0 still converts with calibrated scales.
        prepared.eval()
        with torch.no_grad():
            for x in batches:
                prepared(x)
        ctx.finetune(prepared, epochs=cfg.qat_epochs, lr=cfg.qat_lr, desc="qat")
        return contiguous_before_mean(convert_fx(prepared.cpu().eval())).eval()
