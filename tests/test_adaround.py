"""AdaRound: on a layer whose best rounding is known it finds it where rounding to nearest does not; on a trained net
its rounding differs from nearest, stays on the grid, and reconstructs each layer's output better; it draws exactly
the calibration batches asked for."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pqsweep.quantization import adaround as ar
from pqsweep.quantization.fake_quant import fake_quant, weight_grid

from nets import context, loader, option
from test_recovery import Counting


def known_layer():
    """Linear(3 -> 1), weights [7, 0.45, 0.35] on the 4-bit symmetric grid of step 1 (7 / qmax 7), inputs [r, 1, 1]:
    nearest rounds 0.45 and 0.35 to 0 (output off by 0.8); the best rounding takes exactly one of them up (off by
    0.2). (With two equal fractions, [0.4, 0.4], the two get equal gradients throughout and round alike: AdaRound is
    a gradient method and breaks no tie.)"""
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[7.0, 0.45, 0.35]]))
    torch.manual_seed(0)
    inputs = torch.cat([torch.randn(256, 1), torch.ones(256, 2)], 1)
    return layer, inputs


def test_adaround_finds_the_rounding_that_is_known_best_and_nearest_misses():
    layer, inputs = known_layer()
    grid = weight_grid(layer.weight.data, 4, symmetric=True, per_channel=False)
    forward = ar.layer_function(layer)
    targets = forward(inputs, layer.weight).detach()
    nearest = grid.nearest(layer.weight.data)
    rounded = ar.adaround(layer.weight.data, grid, forward, inputs, targets, iterations=500)
    assert nearest.tolist() == [[7.0, 0.0, 0.0]]
    assert rounded[0, 0] == 7.0 and sorted(rounded[0, 1:].tolist()) == [0.0, 1.0]
    assert ar.reconstruction_error(rounded, forward, inputs, targets) == pytest.approx(0.04, abs=1e-5)
    assert ar.reconstruction_error(nearest, forward, inputs, targets) == pytest.approx(0.64, abs=1e-5)


def test_the_soft_weight_starts_at_the_float_weight_and_beta_anneals_from_20_to_2():
    layer, _ = known_layer()
    grid = weight_grid(layer.weight.data, 4, symmetric=True, per_channel=False)
    v = ar.initial_v(layer.weight.data, grid)
    assert torch.allclose(grid.rounded(layer.weight.data, ar.rectified_sigmoid(v)), layer.weight.data, atol=1e-3)
    assert ar.beta_at(200, 1000) == pytest.approx(20.0) and ar.beta_at(1000, 1000) == pytest.approx(2.0)
    assert ar.regulariser(torch.tensor([50.0, -50.0]), 2.0).item() == pytest.approx(0.0)  # h at 1 and 0: no cost
    assert ar.regulariser(ar.initial_v(torch.tensor([0.5]), grid), 2.0).item() > 0.99  # halfway: the most


def quantized(trained, digits, rounding: str, batches: int = 2, counting: bool = False, iterations: int = 300):
    cfg = option("quantization", "fake_quant", "bits_w=3", "bits_a=8", f"calibration_batches={batches}",
                 f"rounding={rounding}", *([f"adaround_iterations={iterations}"] if rounding == "adaround" else []))
    ctx = context(loader(digits.train, shuffle=True))
    if counting:
        ctx.loaders["train"] = Counting(ctx.loaders["train"])
    torch.manual_seed(0)
    return fake_quant(copy.deepcopy(trained), cfg, ctx), ctx


def layers(model):
    return [m.layer for m in model.modules() if hasattr(m, "input_bits")]


@pytest.mark.slow
def test_on_a_trained_net_its_rounding_differs_from_nearest_stays_on_the_grid_and_reconstructs_better(trained_wide,
                                                                                                       digits):
    nearest, _ = quantized(trained_wide, digits, "nearest")
    adarounded, _ = quantized(trained_wide, digits, "adaround")
    # the first layer sees the same inputs in both (the image): its outputs on calibration data, against float's
    x = torch.cat([x for x, _ in list(loader(digits.train))[:2]])
    folded = torch.fx.experimental.optimization.fuse(copy.deepcopy(trained_wide).eval())
    first_float = next(m for m in folded.modules() if isinstance(m, nn.Conv2d))
    forward = ar.layer_function(first_float)
    targets = forward(x, first_float.weight).detach()
    (a, *_), (b, *_) = layers(nearest), layers(adarounded)
    assert not torch.equal(a.weight, b.weight)
    assert ar.reconstruction_error(b.weight, forward, x, targets) < ar.reconstruction_error(a.weight, forward, x,
                                                                                           targets)
    for layer_a, layer_b in zip(layers(nearest), layers(adarounded)):  # one grid for both: each weight on it
        grid = weight_grid(layer_b.weight.data, 3, True, True)
        steps = layer_b.weight / grid.scale
        assert torch.allclose(steps, steps.round(), atol=1e-4)
        assert ((layer_b.weight - layer_a.weight).abs() <= grid.scale * 1.0001).all()  # at most one step apart


@pytest.mark.parametrize("n", [1, 3])
def test_adaround_draws_exactly_the_calibration_batches(trained_wide, digits, n):
    _, ctx = quantized(trained_wide, digits, "adaround", batches=n, counting=True, iterations=1)
    assert ctx.loaders["train"].drawn == n
