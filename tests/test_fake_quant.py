"""fake_quant: simulated quantization at 2..16 bits keeps its grid, its precision budget and its accuracy."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from pqsweep import measure, models
from pqsweep.pruning import unstructured
from pqsweep.quantization.fake_quant import FakeQuantized, fake_quant
from pqsweep.train import Context

from nets import batches, compose_cfg, context


def quant_cfg(*overrides: str):
    return compose_cfg("quantization=fake_quant", *overrides).quantization


@pytest.fixture(scope="module")
def calibration(digits) -> Context:
    """The first eight training batches as the calibration loader."""
    return context(batches(digits.train, 8))


@pytest.fixture(scope="module")
def test_loader(digits) -> DataLoader:
    return DataLoader(digits.test, batch_size=512)


def top1(model: nn.Module, loader: DataLoader) -> float:
    return measure.accuracy(model, loader)["top1"]


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m.layer for m in model.modules() if isinstance(m, FakeQuantized)]


def test_option_reports_the_weight_bits():
    assert quant_cfg().bits == 8
    assert quant_cfg("quantization.bits_w=4").bits == 4
    assert quant_cfg("quantization.bits_w=4", "quantization.bits_a=2").bits == 4


@pytest.mark.parametrize("bits", [8, 16])
def test_8_and_16_bits_keep_fp32_accuracy(trained_cnn, calibration, test_loader, bits):
    model = fake_quant(trained_cnn, quant_cfg(f"quantization.bits_w={bits}", f"quantization.bits_a={bits}"), calibration)
    # measured: 94.72 % at 16/16 and 8/8, as fp32; one image is 0.28 pp
    assert abs(top1(model, test_loader) - top1(trained_cnn, test_loader)) <= 0.6


def test_2_bit_weights_visibly_degrade(trained_cnn, calibration, test_loader):
    fp32 = top1(trained_cnn, test_loader)
    four = top1(fake_quant(trained_cnn, quant_cfg("quantization.bits_w=4"), calibration), test_loader)
    two = top1(fake_quant(trained_cnn, quant_cfg("quantization.bits_w=2"), calibration), test_loader)
    # measured (symmetric, per channel, 8-bit inputs): fp32 94.7, w4 91.9, w2 74.7. Ternary weights {-s, 0, s}
    # lose about 20 points; a bug that left the weights unrounded would lose nothing, one that rounded to 2 bits
    # at every setting would lose as much at 4.
    assert fp32 - two >= 15.0
    assert four - two >= 12.0
    assert fp32 - four <= 5.0


def test_the_original_model_is_left_alone(trained_cnn, calibration):
    before = copy.deepcopy(trained_cnn.state_dict())
    fake_quant(trained_cnn, quant_cfg("quantization.bits_w=2"), calibration)
    assert all(torch.equal(v, before[k]) for k, v in trained_cnn.state_dict().items())


@pytest.mark.parametrize("bits, symmetric, granularity", [
    (bits, symmetric, granularity)
    for bits in (2, 3, 4)
    for symmetric in (True, False)
    for granularity in ("per_channel", "per_tensor")
])
def test_weights_take_at_most_2_to_the_bits_values(trained_cnn, calibration, bits, symmetric, granularity):
    cfg = quant_cfg(f"quantization.bits_w={bits}", f"quantization.symmetric={symmetric}",
                    f"quantization.granularity={granularity}")
    layers = quantized_layers(fake_quant(trained_cnn, cfg, calibration))
    assert len(layers) == 4
    # symmetric uses the narrow signed range (2^b - 1 levels, symmetric around 0); affine uses all 2^b
    limit = 2**bits - 1 if symmetric else 2**bits
    counts = []
    for layer in layers:
        assert layer.weight_bits == bits and isinstance(layer.weight_bits, int)
        groups = layer.weight.flatten(1) if granularity == "per_channel" else layer.weight.reshape(1, -1)
        counts += [row.unique().numel() for row in groups]
    assert max(counts) <= limit
    assert max(counts) >= limit - 1  # the grid is really used (by the Linear rows of 256 weights), not collapsed


def test_symmetric_and_affine_grids_differ_as_defined(trained_cnn, calibration):
    float_layers = [m for m in trained_cnn.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    symmetric = quantized_layers(fake_quant(trained_cnn, quant_cfg("quantization.bits_w=2"), calibration))
    affine = quantized_layers(fake_quant(trained_cnn, quant_cfg("quantization.bits_w=2", "quantization.symmetric=false"),
                                         calibration))
    for original, sym, aff in zip(float_layers, symmetric, affine):
        w, s, a = (t.detach().flatten(1) for t in (original.weight, sym.weight, aff.weight))
        # symmetric: zero point 0, every channel in {-m, 0, m} with m = max|w| of the channel (kept exactly)
        m = w.abs().amax(1, keepdim=True)
        assert torch.all((s == 0) | torch.isclose(s.abs(), m.expand_as(s)))
        # affine: 4 levels spread over [min(w, 0), max(w, 0)] with 0 on the grid; each weight within half a step
        lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
        step = (hi - lo) / 3
        assert torch.all((a - w).abs() <= step / 2 + 1e-6)
        assert torch.all(a >= lo - step / 2 - 1e-6) and torch.all(a <= hi + step / 2 + 1e-6)
    # the affine grid is finer, so it loses less: its weights are closer to the float ones overall
    error = {name: sum(float((q.weight - f.weight).detach().pow(2).sum()) for q, f in zip(layers, float_layers))
             for name, layers in (("symmetric", symmetric), ("affine", affine))}
    assert error["affine"] < error["symmetric"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_pruned_weights_stay_zero(trained_cnn, calibration, symmetric):
    pruned = copy.deepcopy(trained_cnn)
    unstructured.global_magnitude(pruned, OmegaConf.create({"amount": 0.7}))
    model = fake_quant(pruned, quant_cfg("quantization.bits_w=3", f"quantization.symmetric={symmetric}"), calibration)
    for original, layer in zip([m for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                               quantized_layers(model)):
        assert torch.all(layer.weight[original.weight == 0] == 0)


@pytest.mark.parametrize("bits_a, symmetric", [(2, True), (3, False), (4, True), (8, False)])
def test_layer_inputs_take_at_most_2_to_the_bits_values(trained_cnn, calibration, digits, bits_a, symmetric):
    model = fake_quant(trained_cnn, quant_cfg(f"quantization.bits_a={bits_a}", f"quantization.symmetric={symmetric}"),
                       calibration)
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
             for layer in quantized_layers(model)]
    with torch.no_grad():
        model(next(iter(DataLoader(digits.test, batch_size=256)))[0])
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4
    for x in seen:
        # the image and post-ReLU inputs are non-negative: symmetric then uses the unsigned range [0, 2^b - 1]
        assert 2 <= x.unique().numel() <= 2**bits_a


def test_batchnorm_is_folded_before_rounding(calibration, digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    with torch.no_grad():  # non-trivial running statistics, so folding changes the weights
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    quantized = fake_quant(model, quant_cfg("quantization.bits_w=16", "quantization.bits_a=16"), calibration)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in quantized.modules())
    x = next(iter(DataLoader(digits.test, batch_size=64)))[0]
    with torch.no_grad():
        assert torch.allclose(quantized(x), model(x), atol=1e-2)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated, but what export=torchscript uses
def test_traces_and_reloads_with_identical_outputs(trained_cnn, calibration, digits):
    model = fake_quant(trained_cnn, quant_cfg("quantization.bits_w=4", "quantization.bits_a=4"), calibration)
    x = next(iter(DataLoader(digits.test, batch_size=32)))[0]
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x)
        assert torch.equal(traced(x[:5]), expected[:5])  # traced at batch 32, run at batch 5: no baked-in shapes
    again = fake_quant(models.small_cnn(num_classes=10, in_channels=1), quant_cfg("quantization.bits_w=4",
                                                                                 "quantization.bits_a=4"), calibration)
    again.load_state_dict(model.state_dict())  # the frozen input ranges are buffers, so the file holds them
    with torch.no_grad():
        assert torch.equal(again(x), expected)


@pytest.mark.parametrize("key", ["bits_w", "bits_a"])
def test_bits_out_of_range_is_a_clear_error(trained_cnn, calibration, key):
    cfg = quant_cfg()
    cfg[key] = 1
    with pytest.raises(ValueError, match=rf"quantization\.{key}=1 is not allowed: must be an integer in 2\.\.16"):
        fake_quant(trained_cnn, cfg, calibration)
