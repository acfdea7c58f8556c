"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020): each weight
is rounded down or up to the grid as a few calibration batches say reconstructs the layer's output best, instead of
to the nearest grid point.

For a layer with weight W on the grid (W / s rounded, plus the zero point, clamped to [qmin, qmax]), AdaRound learns
V (one value per weight) in

    W~ = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z),   h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

(the rectified sigmoid, zeta = 1.1, gamma = -0.1) by minimising, with Adam, the layer's output error on the
calibration inputs plus lambda * sum(1 - |2 h(V) - 1|^beta), the regulariser that drives each h(V) to 0 or 1, with beta
annealed from 20 to 2 after a warm start of 20 % of the iterations without it (the paper's Eq. 21-24 and schedule;
lambda = 0.01 as in AIMET). V starts where h(V) is the fractional part of W / s, so the soft weight starts at W.
Then each weight rounds up where h(V) >= 0.5. The layers are rounded in order, each on its inputs as the layers
rounded before it leave them, against the float layer's outputs on the float model's inputs (the paper's
"asymmetric" reconstruction, Eq. 25, before the activation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

ZETA, GAMMA = 1.1, -0.1
REGULARISATION = 0.01  # lambda
WARM_START = 0.2  # share of the iterations before the regulariser starts
BETA = (20.0, 2.0)  # annealed from, to
LEARNING_RATE = 1e-3
BATCH = 32  # calibration samples per iteration


@dataclass(frozen=True)
class Grid:
    """A weight's quantization grid, each tensor broadcastable against the weight."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: torch.Tensor
    qmax: torch.Tensor

    def nearest(self, weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(weight / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def rounded(self, weight: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """`weight` rounded down, plus `up` (0..1, soft or hard) of a step, on the grid."""
        q = torch.clamp(torch.floor(weight / self.scale) + up + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def initial_v(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """V whose h(V) is the fractional part of W / s: the soft-rounded weight starts as the float one."""
    rest = (weight / grid.scale - torch.floor(weight / grid.scale)).clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def regulariser(v: torch.Tensor, beta: float) -> torch.Tensor:
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta_at(step: int, iterations: int) -> float:
    """The annealed beta: from 20 right after the warm start, to 2 at the last iteration."""
    start = int(WARM_START * iterations)
    progress = (step - start) / max(iterations - start, 1)
    return BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(progress * math.pi))


def layer_function(layer: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(input, weight) -> the layer's output with that weight (a Conv2d or Linear, its bias as it is)."""
    if isinstance(layer, nn.Conv2d):
        return lambda x, w: F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.Linear):
        return lambda x, w: F.linear(x, w, layer.bias)
    raise TypeError(f"AdaRound rounds Conv2d and Linear weights, not {type(layer).__name__}")


def adaround(weight: torch.Tensor, grid: Grid, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             inputs: torch.Tensor, targets: torch.Tensor, iterations: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The weight rounded by AdaRound: `forward(x, w)` is the layer, `inputs` what reaches it, `targets` the float
    layer's outputs to reconstruct. Returns the hard-rounded weight (float values on the grid)."""
    weight = weight.detach()
    v = nn.Parameter(initial_v(weight, grid))
    optimizer = torch.optim.Adam([v], lr=LEARNING_RATE)
    generator = generator or torch.Generator().manual_seed(0)
    start = int(WARM_START * iterations)
    for step in range(iterations):
        idx = torch.randint(len(inputs), (min(BATCH, len(inputs)),), generator=generator)
        out = forward(inputs[idx], grid.rounded(weight, rectified_sigmoid(v)))
        loss = (out - targets[idx]).pow(2).flatten(1).sum(1).mean()
        if step >= start:
            loss = loss + REGULARISATION * regulariser(v, beta_at(step, iterations))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return grid.rounded(weight, (rectified_sigmoid(v) >= 0.5).float())


def reconstruction_error(weight: torch.Tensor, forward, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over samples of the squared output error of the layer with `weight`."""
    with torch.no_grad():
        return (forward(inputs, weight) - targets).pow(2).flatten(1).sum(1).mean().item()
