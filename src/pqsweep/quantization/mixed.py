"""Mixed precision (torch.ao FX): static int8 everywhere except the layers named fp32 (001: an FP32 classifier head)."""

from __future__ import annotations

from torch import nn

from pqsweep.quantization.engine import quiet_deprecations, set_engine
from pqsweep.quantization.fx import calibrate_and_convert, static_mapping, static_qconfig
from pqsweep.weights import prunable_layers

def mixed(model: nn.Module, cfg, ctx) -> nn.Module:
    """Per-layer precision: static int8 (FX) everywhere except the layers `cfg.layers` maps to fp32, which stay
    float32 with (de)quantization around them. `head` names the model's last nn.Linear (001: FP32 classifier)."""
    set_engine(cfg.engine)
    layers = _resolve_layers(model, dict(cfg.layers or {}))
    with quiet_deprecations():
        mapping, qconfig = static_mapping(cfg), static_qconfig(cfg)
        for name, precision in layers.items():
            # an explicit int8 entry matters when it sits inside a module mapped to fp32 (longest name wins)
            mapping.set_module_name(name, None if precision == "fp32" else qconfig)
        return calibrate_and_convert(model, mapping, cfg, ctx)


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
