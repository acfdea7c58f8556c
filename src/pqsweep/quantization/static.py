"""`quantization=static_int8`: post-training static int8 by the backend the option names, torch.ao FX
(pqsweep.quantization.fx) or torchao's PT2E (pqsweep.quantization.pt2e, imported only when asked for: torchao is slow
to import)."""

from __future__ import annotations

from torch import nn

from pqsweep.quantization.engine import option_value


def static_int8(model: nn.Module, cfg, ctx) -> nn.Module:
    """int8 weights and activations, observers calibrated on `cfg.calibration_batches` training batches."""
    backend = option_value(cfg.get("backend") or "fx")
    if backend == "fx":
        from pqsweep.quantization.fx import static_int8_fx

        return static_int8_fx(model, cfg, ctx)
    if backend == "pt2e":
        from pqsweep.quantization.pt2e import static_int8_pt2e

        return static_int8_pt2e(model, cfg, ctx)
    raise ValueError(f"quantization.backend={backend} is not allowed: must be fx or pt2e")
