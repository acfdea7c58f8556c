"""Each step of a run alone on a toy model: pruning, fine-tuning after it, quantization and measurement (the stage
machinery that caches them is tests/test_stage_cache.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hydra.utils import get_method
from omegaconf import OmegaConf
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.utils.data import DataLoader, TensorDataset

from pqsweep import measure, models, pipeline, weights
from pqsweep.pruning import unstructured

from nets import batches, compose_cfg, context, loader, option, outputs, quantize, small_cnn, top1, wide_convnet


# --- pruning ---------------------------------------------------------------------------------------------------

PRUNERS = {"global_magnitude": unstructured.global_magnitude, "layer_magnitude": unstructured.layer_magnitude}
AMOUNTS = [0.5, 0.9, 0.99]


def pruned_small_cnn(method: str, amount: float) -> tuple[nn.Module, nn.Module]:
    """(the model before pruning, the same model pruned in place)."""
    model = small_cnn()
    original = copy.deepcopy(model)
    PRUNERS[method](model, OmegaConf.create({"amount": amount}))
    return original, model


def layer_sparsities(model: nn.Module) -> dict[str, float]:
    return {name: (m.weight == 0).float().mean().item() for name, m in weights.prunable_layers(model)}


@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("method", PRUNERS)
def test_achieved_sparsity_is_the_amount(method, amount):
    _, model = pruned_small_cnn(method, amount)
    assert measure.parameter_counts(model)["sparsity"] == pytest.approx(amount, abs=0.01)


@pytest.mark.parametrize("amount", AMOUNTS)
def test_layer_magnitude_prunes_every_layer_by_the_amount(amount):
    _, model = pruned_small_cnn("layer_magnitude", amount)
    # the smallest layer (conv1, 72 weights) can only be pruned in steps of 1/72 = 1.4 %: rounding costs < 1 %
    for name, sparsity in layer_sparsities(model).items():
        assert sparsity == pytest.approx(amount, abs=0.01), name


@pytest.mark.parametrize("amount", AMOUNTS)
def test_global_magnitude_ranks_over_all_layers(amount):
    original, model = pruned_small_cnn("global_magnitude", amount)
    survivors, pruned = [], []
    for (_, before), (_, after) in zip(weights.prunable_layers(original), weights.prunable_layers(model)):
        kept = after.weight != 0
        torch.testing.assert_close(after.weight[kept], before.weight[kept])  # survivors are untouched
        survivors.append(before.weight[kept].abs())
        pruned.append(before.weight[~kept].abs())
    assert torch.cat(survivors).min() >= torch.cat(pruned).max()
    # ranked together, layers with larger weights (conv1: fan-in 9) keep more: not every layer at the amount
    assert any(abs(s - amount) > 0.01 for s in layer_sparsities(model).values())


@pytest.mark.parametrize("method", PRUNERS)
def test_masks_are_folded_and_survive_save_and_load(method):
    _, model = pruned_small_cnn(method, 0.9)
    state = model.state_dict()
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    assert not [m for m in model.modules() if m._forward_pre_hooks]

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = small_cnn(seed=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # strict: the keys of a plain small_cnn
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    assert measure.parameter_counts(fresh)["sparsity"] == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize("method", PRUNERS)
def test_amount_zero_keeps_every_weight(method):
    original, model = pruned_small_cnn(method, 0.0)
    for (_, before), (_, after) in zip(weights.prunable_layers(original), weights.prunable_layers(model)):
        assert torch.equal(before.weight, after.weight)


def test_masks_keep_pruned_weights_at_zero_after_an_optimizer_step():
    _, model = pruned_small_cnn("global_magnitude", 0.9)
    masks = weights.zero_masks(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(16, 1, 28, 28)), torch.randint(0, 10, (16,)))
    loss.backward()
    optimizer.step()
    # the step itself revives pruned weights (their gradients are not zero) ...
    assert any((m.weight[masks[name]] != 0).any() for name, m in weights.prunable_layers(model))
    weights.apply_masks(model, masks)
    # ... and re-applying the masks puts them back to zero while the survivors keep their update
    for name, m in weights.prunable_layers(model):
        assert (m.weight[masks[name]] == 0).all(), name
    assert measure.parameter_counts(model)["sparsity"] == pytest.approx(0.9, abs=0.01)


# --- fine-tuning after pruning: pipeline.prune_and_finetune ---------------------------------------------------


def prune_with(trained: nn.Module, digits, *overrides: str) -> tuple[nn.Module, nn.Module]:
    """(the pruner's output alone, what pipeline.prune_and_finetune makes of the same model) for these overrides."""
    cfg = compose_cfg(*overrides)
    alone = get_method(cfg.pruning._target_)(copy.deepcopy(trained), cfg.pruning, None)
    tuned = pipeline.prune_and_finetune(cfg, copy.deepcopy(trained), context(loader(digits.train, shuffle=True),
                                                                             cfg.train))
    return alone, tuned


def test_fine_tuning_after_pruning_recovers_accuracy_and_keeps_the_zeros(trained_wide, digits):
    alone, tuned = prune_with(trained_wide, digits, "pruning=global_magnitude", "pruning.amount=0.95",
                              "train.finetune_epochs=1")
    # the zeros are the pruner's, and stay zero through the optimizer steps
    masks, held = weights.zero_masks(alone), weights.zero_masks(tuned)
    assert all(torch.equal(masks[name], held[name]) for name in masks)
    assert measure.parameter_counts(tuned)["sparsity"] == pytest.approx(0.95, abs=1e-4)
    # the survivors moved, and that bought accuracy back: measured 82.2 % pruned alone -> 94.2 % after one epoch
    assert not all(torch.equal(a.weight, t.weight) for (_, a), (_, t) in
                   zip(weights.prunable_layers(alone), weights.prunable_layers(tuned)))
    assert top1(tuned, digits.test) >= top1(alone, digits.test) + 10


@pytest.mark.parametrize("overrides", [
    ["pruning=global_magnitude", "pruning.amount=0.95", "train.finetune_epochs=0"],  # asked for none
    ["pruning=none", "train.finetune_epochs=1"],  # nothing was removed: nothing to recover
])
def test_no_fine_tuning_when_none_is_asked_for_or_nothing_was_pruned(trained_wide, digits, overrides):
    alone, tuned = prune_with(trained_wide, digits, *overrides)
    assert all(torch.equal(value, tuned.state_dict()[key]) for key, value in alone.state_dict().items())


# --- quantization ----------------------------------------------------------------------------------------------

QUANTIZERS = ["none", "fp16", "dynamic_int8", "static_int8"]


def quantized(name: str, model: nn.Module, calibration, *overrides: str) -> nn.Module:
    """Quantize with the real `quantization=<name>` option (plus `quantization.` overrides), as the pipeline does."""
    return quantize(name, model, context(calibration), *overrides)


@pytest.fixture(scope="module")
def calibration(digits):
    """The first two training batches, the same whichever test asks first."""
    return batches(digits.train, 2)


@pytest.fixture(scope="module")
def deployed(trained_wide, calibration):
    """Every quantization option applied once to the trained model."""
    return {name: quantized(name, trained_wide, calibration) for name in QUANTIZERS}


@pytest.fixture(scope="module")
def held_out_images(digits):
    return next(iter(DataLoader(digits.test, batch_size=len(digits.test))))[0]


# measured 0.503, 0.306 (the convs stay float32) and 0.262 (int8, with float32 biases, scales and file framing)
@pytest.mark.parametrize("name, low, high", [("none", 1.0, 1.0), ("fp16", 0.49, 0.52), ("dynamic_int8", 0.29, 0.32),
                                             ("static_int8", 0.25, 0.28)])
def test_size_follows_the_storage_precision(deployed, name, low, high):
    ratio = measure.sizes(deployed[name])["size_mb"] / measure.sizes(deployed["none"])["size_mb"]
    assert low <= ratio <= high


def test_static_int8_stores_int8_weights(deployed):
    def tensors(value):  # quantized Linear keeps (weight, bias) in a packed-params tuple
        return [t for v in value for t in tensors(v)] if isinstance(value, tuple) else [value]

    stored = [t for v in deployed["static_int8"].state_dict().values() for t in tensors(v)]
    weights = [t for t in stored if isinstance(t, torch.Tensor) and t.dim() >= 2]
    assert len(weights) == 4  # two convs, two linears
    assert all(w.dtype == torch.qint8 for w in weights)


@pytest.mark.parametrize("name, min_agreement", [("none", 1.0), ("fp16", 0.995), ("dynamic_int8", 0.99),
                                                 ("static_int8", 0.99)])
def test_quantized_outputs_agree_with_fp32(deployed, held_out_images, name, min_agreement):
    reference = outputs(deployed["none"], held_out_images)
    logits = outputs(deployed[name], held_out_images)
    assert logits.dtype == torch.float32 and logits.shape == (len(held_out_images), 10)
    # The net is about 97 % accurate on these 360 images. Rounding the weights (and, for int8, the activations)
    # to 16 or 8 bits moves a logit by much less than the gap between the top two on all but a handful of
    # images (we measured 99.7-100 % agreement: at most one of 360 flips); a mis-scaled or unfused layer changes
    # most predictions.
    agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= min_agreement


def test_dynamic_int8_quantizes_linear_layers_only(deployed):
    model = deployed["dynamic_int8"]
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(nnqd.Linear) == 2
    assert nn.Linear not in kinds
    assert kinds.count(nn.Conv2d) == 2 and kinds.count(nn.BatchNorm2d) == 2  # float, unfused
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("engine, per_channel", [
    ("x86", True),
    ("x86", False),
    ("fbgemm", True),
    ("fbgemm", False),
    ("qnnpack", True),
    ("qnnpack", False),
])
def test_granularity_sets_the_weight_qscheme(trained_wide, calibration, engine, per_channel):
    granularity = "per_channel" if per_channel else "per_tensor"
    model = quantized("static_int8", trained_wide, calibration, f"engine={engine}", f"granularity={granularity}")
    expected = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    layers = [m for m in model.modules() if callable(getattr(m, "weight", None))]
    assert len(layers) == 4
    assert {m.weight().qscheme() for m in layers} == {expected}
    assert outputs(model, torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["dynamic_int8", "static_int8"])
def test_unsupported_engine_is_a_clear_error(name):
    # composition refuses names outside the Engine enum; this is the guard for a build without the engine
    quantizer = get_method(option("quantization", name)._target_)
    cfg = OmegaConf.create({"engine": "foo", "granularity": "per_channel", "calibration_batches": 1})
    with pytest.raises(RuntimeError, match=r"quantization\.engine=foo: not supported .*supported: .*x86"):
        quantizer(small_cnn(), cfg, context([]))


# --- measure ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZERS)
def test_parameter_counts_see_through_quantization(name):
    # small_cnn has no BatchNorm: every option stores the same weights and biases, whatever their precision
    model = small_cnn()
    calibration = [(torch.randn(8, 1, 28, 28), None) for _ in range(2)]
    assert measure.parameter_counts(quantized(name, model, calibration))["params_total"] == \
        measure.parameter_counts(model)["params_total"]


def test_parameter_counts_after_conv_bn_folding(trained_wide, deployed):
    # static_int8 folds each BatchNorm into the conv before it: BN's weight and bias (2 C) vanish, and a conv
    # without a bias gains one (C). Here conv1 has no bias (net -32) and conv2 has one (-2 * 64).
    folded = 32 + 2 * 64
    float_total = measure.parameter_counts(trained_wide)["params_total"]
    assert measure.parameter_counts(deployed["static_int8"])["params_total"] == float_total - folded
    assert measure.parameter_counts(deployed["dynamic_int8"])["params_total"] == float_total


def test_sparsity_survives_int8_quantization(calibration):
    # pruned weights are exactly 0 and int8 weights are symmetric (zero point 0), so they stay 0; a few small
    # survivors may round to 0 as well
    torch.manual_seed(0)
    model = wide_convnet().eval()
    unstructured.global_magnitude(model, OmegaConf.create({"amount": 0.9}))
    sparsity = measure.parameter_counts(quantized("static_int8", model, calibration))["sparsity"]
    assert 0.9 - 1e-4 <= sparsity < 0.9 + 1e-3  # 0.9 of the weights, rounded to whole weights (measured 0.900001)


def hooked_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs from the layer shapes seen in a forward pass: Cout * Cin/groups * kh * kw * Hout * Wout, in * out."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kh * kw  # batch 1: numel = C*H*W
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    outputs(model, x)
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("side", [28, 8])
def test_macs_of_small_cnn_by_hand(side):
    half = side // 2  # after the first 2x2 max-pool
    expected = (
        8 * 1 * 3 * 3 * side * side  # conv1: 1 -> 8 channels, 3x3, padding 1 keeps the size
        + 16 * 8 * 3 * 3 * half * half  # conv2: 8 -> 16 channels
        + 256 * 64  # fc1 after the 4x4 adaptive pool: 16 * 4 * 4 -> 64
        + 64 * 10  # fc2
    )
    # pools, ReLUs and bias additions are not multiply-accumulates and are not counted
    assert measure.macs(small_cnn(), torch.randn(1, 1, side, side)) == expected
    assert side != 28 or expected == 299_264


def test_macs_of_resnet18_cifar():
    torch.manual_seed(0)
    model = models.resnet18_cifar(num_classes=10, in_channels=3).eval()
    x = torch.randn(1, 3, 32, 32)
    result = measure.macs(model, x)
    assert result == hooked_macs(model, x)
    assert result == pytest.approx(0.556e9, rel=0.01)  # the figure quoted for ResNet-18 on CIFAR-10


def test_gzip_size_rewards_zeros():
    dense = small_cnn()
    sparse = small_cnn()
    unstructured.global_magnitude(sparse, OmegaConf.create({"amount": 0.9}))
    dense_sizes, sparse_sizes = measure.sizes(dense), measure.sizes(sparse)
    # zeros are stored densely: the raw file keeps its size (up to the zip container's alignment padding)
    assert sparse_sizes["size_mb"] == pytest.approx(dense_sizes["size_mb"], rel=0.01)
    # measured 0.14 of the raw file and 0.15 of the dense file's gzip: zeros compress, random floats do not
    assert sparse_sizes["size_gzip_mb"] < 0.2 * sparse_sizes["size_mb"]
    assert sparse_sizes["size_gzip_mb"] < 0.2 * dense_sizes["size_gzip_mb"]
    assert dense_sizes["size_mb"] == pytest.approx(18_346 * 4 / 1e6, rel=0.06)  # fp32 weights plus 4 % framing


@pytest.mark.parametrize("threads", [1, 2])
def test_latency_percentiles(threads):
    before = torch.get_num_threads()
    result = measure.latency(small_cnn(), torch.randn(1, 1, 28, 28), threads=threads, warmup=2, repeats=5)
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p90"]
    assert result["latency_threads"] == threads
    assert torch.get_num_threads() == before  # the fixed thread count is the measurement's only


def test_latency_ranks_a_slow_model_above_a_trivial_one():
    # Both in one process, as a ratio: the machine is noisy, absolute times mean nothing. resnet18_cifar does 1,860x
    # the MACs of small_cnn; measured 175-200x the time. A timer that times anything but the forward pass sees ~1x.
    torch.manual_seed(0)
    slow = measure.latency(models.resnet18_cifar(num_classes=10, in_channels=3).eval(), torch.randn(1, 3, 32, 32),
                           threads=1, warmup=2, repeats=5)
    fast = measure.latency(small_cnn(), torch.randn(1, 1, 32, 32), threads=1, warmup=2, repeats=5)
    assert slow["latency_ms_p50"] > 50 * fast["latency_ms_p50"]


def fixed_loader(logits: list[list[float]], labels: list[int], batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.tensor(logits), torch.tensor(labels)), batch_size=batch_size)


def identity_linear(n: int) -> nn.Module:
    """A classifier that returns its input as logits, so each test row says what is predicted."""
    layer = nn.Linear(n, n)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
        layer.bias.zero_()
    return layer


def test_accuracy_counts_top1_and_top5_exactly():
    ranking = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # class i is ranked i-th
    labels = [0, 1, 4, 5, 9, 0, 2]  # ranks 1, 2, 5, 6, 10, 1, 3: top-1 2 of 7, top-5 5 of 7
    loader = fixed_loader([ranking] * len(labels), labels, batch_size=3)  # three batches, the last short
    result = measure.accuracy(identity_linear(10), loader)
    assert result == {"top1": pytest.approx(100 * 2 / 7), "top5": pytest.approx(100 * 5 / 7)}


def test_top5_of_fewer_than_five_classes_is_everything():
    loader = fixed_loader([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]], [2, 0], batch_size=2)
    assert measure.accuracy(identity_linear(3), loader) == {"top1": 0.0, "top5": 100.0}
