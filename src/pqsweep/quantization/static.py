"""`quantization=static_int8`: post-training static int8 by the backend the option names, torch.ao FX
(pqsweep.quantization.fx) or torchao's PT2E (pqsweep.quantization.pt2e, imported only when asked for: torchao is slow
to import)."""

from __future__ import annotations

import dataclasses

from torch import nn

from pqsweep.quantization.engine import option_value


def static_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """int8 weights and activations, observers calibrated on `cfg.calibration_batches` training batches; the float
    model equalized and its biases corrected first where the option asks (pqsweep.quantization.ptq)."""
    if cfg.get("equalize") or cfg.get("bias_correction"):
        model, ctx = prepared_float(model, cfg, ctx)
    backend = option_value(cfg.get("backend") or "fx")
    if backend == "fx":
        from pqsweep.quantization.fx import static_int8_fx

        return static_int8_fx(model, cfg, ctx)
    if backend == "pt2e":
        from pqsweep.quantization.pt2e import static_int8_pt2e

        return static_int8_pt2e(model, cfg, ctx)
    raise ValueError(f"quantization.backend={backend} is not allowed: must be fx or pt2e")


def prepared_float(model: nn.Module, cfg, ctx):
    """(the float model with BatchNorm folded, equalized and bias-corrected as asked, a context whose training
    loader is the calibration batches): the batches are drawn once, so bias correction and the observers see the
    same ones and the step draws calibration_batches, no more."""
    from pqsweep.quantization import ptq
    from pqsweep.quantization.fx import calibration_batches, static_qconfig

    batches = calibration_batches(cfg, ctx)
    model = ptq.folded(model)
    if cfg.equalize:
        ptq.equalize(model)
    if cfg.bias_correction:
        ptq.correct_biases(model, static_qconfig(cfg).weight, batches)
    return model, dataclasses.replace(ctx, loaders={**ctx.loaders, "train": [(x, None) for x in batches]})
