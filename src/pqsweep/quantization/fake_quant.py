"""Simulated (fake) quantization at any bit width from 2 to 16: the q_w / q_a studies of 002_e778e29164e4c1fd.txt.

What `fake_quant` returns, for `quantization=fake_quant quantization.bits_w=4 quantization.bits_a=8`:
- BatchNorm is first folded into the Conv2d before it (as every int8 deployment does), so the rounded weights are
  the ones a deployed model would store.
- Weights of every Conv2d and Linear are rounded once to `bits_w` bits and stored as their dequantized values, in
  float32: `w = (q - z) * s` with integer `q`. Symmetric: z = 0 and q in [-(2^(b-1) - 1), 2^(b-1) - 1] (the
  narrow signed range, so the grid is symmetric around 0: 2^b - 1 levels, {-s, 0, s} at 2 bits), s = max|w| / (2^(b-1)
  - 1). Asymmetric (affine): q in [0, 2^b - 1], the range [min(w, 0), max(w, 0)] spread over all 2^b levels. Both keep
  0 exactly representable, so pruned weights stay zero. Per output channel or per tensor (`granularity`).
- The *input* of every Conv2d and Linear is fake-quantized at `bits_a` bits, per tensor, with a range set by min/max
  over `calibration_batches` training batches and then frozen. Inputs rather than outputs, because the inputs are
  what a layer's multiply-accumulates consume (so each layer computes at q_w x q_a bits, the paper's cost model),
  while the image enters quantized and the logits leave in float, as in an integer deployment. Symmetric activations
  whose calibrated minimum is >= 0 (after a ReLU) use the unsigned range [0, 2^b - 1], otherwise the narrow signed one.
- Every quantized layer (the Conv2d / Linear that owns `.weight`) carries `weight_bits = bits_w`, so measure can
  count its size as non-zeros x bits / 8; `size_mb` stays the float32 file, which is what is really stored.

The rounding is plain float math (round, clamp, multiply) rather than torch.fake_quantize_per_tensor_affine: both
ONNX exporters refuse that op outside the (0, 255) / (-128, 127) ranges, and the math is the same (round half to even).
The forward has no data-dependent Python branches, so torch.jit.trace and torch.onnx.export see the whole graph.
"""

from __future__ import annotations

import copy
from itertools import islice
from typing import Callable

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from pqsweep.quantization.adaround import Grid, adaround, layer_function

QUANTIZED_LAYERS = (nn.Conv2d, nn.Linear)


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin, qmax) -> torch.Tensor:
    """Round `x` to the grid (q - zero_point) * scale with integer q in [qmin, qmax]; returns float values."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """(scale, zero_point, qmin, qmax) for values in [lo, hi] (tensors, elementwise per channel).

    symmetric: zero point 0; unsigned [0, 2^b - 1] where lo >= 0, else the narrow signed [-(2^(b-1) - 1), 2^(b-1) - 1].
    asymmetric: [0, 2^b - 1] covering [min(lo, 0), max(hi, 0)]. Ranges always include 0, so 0 stays exact.
    """
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    tiny = torch.finfo(torch.float32).eps  # an all-zero channel (a pruned filter) gets a harmless non-zero scale
    levels = 2**bits - 1
    if symmetric:
        unsigned = lo >= 0
        qmax = torch.where(unsigned, float(levels), float(2 ** (bits - 1) - 1))
        qmin = torch.where(unsigned, 0.0, -qmax)
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=tiny)
        zero_point = torch.zeros_like(scale)
    else:
        qmin, qmax = torch.zeros_like(lo), torch.full_like(lo, float(levels))
        scale = torch.clamp((hi - lo) / levels, min=tiny)
        zero_point = torch.clamp(torch.round(-lo / scale), 0, levels)
    return scale, zero_point, qmin, qmax


@torch.no_grad()
def weight_grid(weight: torch.Tensor, bits: int, symmetric: bool, per_channel: bool) -> Grid:
    """The grid a weight is rounded to: per output channel or per tensor, shaped to broadcast against the weight."""
    flat = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    # Weights use the signed grid even when a channel happens to be all positive, as int8 weights do.
    found = qparams(-flat.abs().amax(1) if symmetric else flat.amin(1), flat.amax(1), bits, symmetric)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return Grid(*(t.reshape(shape) for t in found))


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int, symmetric: bool, per_channel: bool) -> torch.Tensor:
    """The weight rounded to the nearest point of its `bits`-bit grid and dequantized (same shape, float32)."""
    return weight_grid(weight, bits, symmetric, per_channel).nearest(weight)


class FakeQuantized(nn.Module):
    """A Conv2d or Linear (`layer`, weight already rounded) whose input is fake-quantized per tensor."""

    def __init__(self, layer: nn.Module, input_bits: int, symmetric: bool, lo: torch.Tensor, hi: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.input_bits = input_bits
        self.symmetric = symmetric
        # Buffers, not Python numbers, so a saved state_dict holds the frozen input range; calibrated [lo, hi].
        for name, value in zip(("scale", "zero_point", "qmin", "qmax"), qparams(lo, hi, input_bits, symmetric)):
            self.register_buffer(f"input_{name}", value.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize(x, self.input_scale, self.input_zero_point, self.input_qmin, self.input_qmax)
        return self.layer(x)

    def extra_repr(self) -> str:
        return f"input_bits={self.input_bits}, symmetric={self.symmetric}"


def fake_quant(model: nn.Module, cfg, ctx) -> nn.Module:
    """Weights at cfg.bits_w and layer inputs at cfg.bits_a bits (simulated, float32 storage); see the module doc."""
    for key in ("bits_w", "bits_a"):
        if not 2 <= cfg[key] <= 16:
            raise ValueError(f"quantization.{key}={cfg[key]} is not allowed: must be an integer in 2..16")
    per_channel = str(getattr(cfg.granularity, "value", cfg.granularity)) == "per_channel"
    model = fuse(copy.deepcopy(model).cpu().eval(), inplace=True)  # BatchNorm folded into its conv
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
    bits = layer_bits(cfg, [name for name, _ in found])
    layers = [(name, m) for name, m in found if bits[name] != FLOAT_BITS]  # a 32-bit layer stays float, input too
    batches = [x.cpu() for x, _ in islice(ctx.loaders["train"], cfg.calibration_batches)]
    ranges = _input_ranges(model, [layer for _, layer in layers], batches) if layers else []
    grids = [weight_grid(layer.weight.data, bits[name], cfg.symmetric, per_channel) for name, layer in layers]
    if str(getattr(cfg.get("rounding"), "value", cfg.get("rounding"))) == "adaround":
        _adaround(model, layers, grids, batches, int(cfg.adaround_iterations))
    else:
        for (_, layer), grid in zip(layers, grids):
            layer.weight.data = grid.nearest(layer.weight.data)
    for (name, layer), (lo, hi) in zip(layers, ranges):
        layer.weight_bits = bits[name]
        parent, _, attr = name.rpartition(".")
        # fuse() returns a GraphModule whose code looks submodules up by name at call time, so it runs the wrapper
        setattr(model.get_submodule(parent), attr, FakeQuantized(layer, cfg.bits_a, cfg.symmetric, lo, hi))
    return model.eval()


FLOAT_BITS = 32  # a layer_bits value that keeps the layer in float32


def layer_bits(cfg, names: list[str]) -> dict[str, int]:
    """Each layer's weight bits: `layer_bits` for the layers it names (an allocation), `bits_w` for the rest."""
    given = {str(k): int(v) for k, v in (cfg.get("layer_bits") or {}).items()}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"quantization.layer_bits: no Conv2d/Linear layer named {', '.join(unknown)} (layers: "
                         f"{', '.join(names)})")
    wrong = {k: v for k, v in given.items() if not (2 <= v <= 16 or v == FLOAT_BITS)}
    if wrong:
        raise ValueError(f"quantization.layer_bits={wrong} is not allowed: each must be an integer in 2..16, or 32")
    return {name: given.get(name, int(cfg.bits_w)) for name in names}


def _adaround(model: nn.Module, layers: list[tuple[str, nn.Module]], grids: list[Grid], batches, iterations: int):
    """Each layer's weight rounded by AdaRound, in order: its inputs as the layers rounded before it leave them, its
    targets the float layer's outputs on the float model's inputs (pqsweep.quantization.adaround)."""
    float_model = copy.deepcopy(model)
    float_inputs = layer_inputs(float_model, [float_model.get_submodule(name) for name, _ in layers], batches)
    generator = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,)).item()))  # from train.seed
    for (name, layer), grid, x in zip(layers, grids, float_inputs):
        forward = layer_function(layer)
        with torch.no_grad():
            targets = forward(x, layer.weight)
        (reaching,) = layer_inputs(model, [layer], batches)
        layer.weight.data = adaround(layer.weight.data, grid, forward, reaching, targets, iterations, generator)


@torch.no_grad()
def observed(model: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor],
             keep: Callable[[torch.Tensor], torch.Tensor]) -> list[list[torch.Tensor]]:
    """`keep(input)` of each of `layers`, per batch, over one pass of `model` through the batches."""
    seen = {id(layer): [] for layer in layers}
    hooks = [layer.register_forward_pre_hook(lambda module, args: seen[id(module)].append(keep(args[0].detach())))
             for layer in layers]
    try:
        for x in batches:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[id(layer)] for layer in layers]


def layer_inputs(model: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """What reaches each of `layers` over the batches, concatenated."""
    return [torch.cat(found) for found in observed(model, layers, batches, lambda x: x)]


def _input_ranges(model: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor]):
    """(min, max) of each layer's input over the batches, in one pass of the float model, as torch.ao's static
    quantization observes them (min/max rather than a moving average: a few batches, and every value counts)."""
    if not batches:
        raise ValueError("quantization.calibration_batches: the training loader gave no batches to calibrate on")
    extremes = observed(model, layers, batches, lambda x: torch.stack([x.min(), x.max()]))
    return [(torch.stack(found)[:, 0].min(), torch.stack(found)[:, 1].max()) for found in extremes]
