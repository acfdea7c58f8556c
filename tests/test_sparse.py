"""quantization=sparse: CSR layers compute what the dense ones do, are stored (and measured) as CSR, follow the
conversion rule, survive copies, state dicts and TorchScript, and run through the pipeline on digits."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pqsweep import measure, models
from pqsweep.checks import ConfigError
from pqsweep.validate import validate
from pqsweep.export import ExportError, export
from pqsweep.pipeline import run
from pqsweep.pruning import unstructured
from pqsweep.quantization.sparse import MAX_DENSITY, CsrConv2d, CsrLinear, sparse, sparsify

from nets import compose_cfg, option, outputs


def pruned(layer: nn.Module, density: float, seed: int = 0) -> nn.Module:
    """`layer` with a random `density` share of its weights kept (the rest exactly zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < density)
    return layer.eval()


def csr_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (CsrLinear, CsrConv2d))]


@pytest.fixture(scope="module")
def pruned_cnn() -> nn.Module:
    """The project's cnn for 8x8 digits, magnitude-pruned to 90 % in every layer."""
    torch.manual_seed(0)
    return unstructured.layer_magnitude(models.small_cnn(10, 1).eval(), OmegaConf.create({"amount": 0.9}))


# --- outputs: the CSR forms compute what the dense layers compute --------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 300), (7, 300), (2, 3, 300)])
def test_a_csr_linear_computes_the_dense_outputs(bias, shape):
    dense = pruned(nn.Linear(300, 40, bias=bias), 0.1)
    x = torch.randn(shape)
    torch.testing.assert_close(outputs(CsrLinear(dense), x), outputs(dense, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 1), padding=(1, 0), dilation=(2, 1)),
    dict(kernel_size=1),  # pointwise: no unfold
    dict(kernel_size=1, stride=2),
])
def test_a_csr_conv_computes_the_dense_outputs(conv, batch):
    dense = pruned(nn.Conv2d(16, 24, **conv), 0.1)
    x = torch.randn(batch, 16, 9, 7)
    torch.testing.assert_close(outputs(CsrConv2d(dense), x), outputs(dense, x), rtol=1e-5, atol=1e-5)


def test_a_sparse_model_computes_the_dense_outputs(pruned_cnn, digits):
    deployed = sparse(pruned_cnn, option("quantization", "sparse"), None)
    x = torch.stack([digits.test[i][0] for i in range(16)])
    assert csr_layers(deployed) == ["8", "10"]  # without an example input only the Linear layers
    torch.testing.assert_close(outputs(deployed, x), outputs(pruned_cnn, x), rtol=1e-5, atol=1e-5)
    with_convs = sparsify(copy.deepcopy(pruned_cnn), x[:1])
    assert csr_layers(with_convs) == ["0", "3", "8", "10"]  # 8x8 and 4x4 maps: 64 and 16 positions
    torch.testing.assert_close(outputs(with_convs, x), outputs(pruned_cnn, x), rtol=1e-5, atol=1e-5)


# --- the rule: only layers where CSR pays --------------------------------------------------------------------------


def test_only_sparse_enough_layers_on_small_enough_maps_are_converted():
    model = nn.Sequential(
        pruned(nn.Conv2d(3, 8, 3, padding=1), 0.1),  # 16x16 output: 256 positions, unfolding costs more
        pruned(nn.Conv2d(8, 8, 3, stride=2, padding=1), 0.1),  # 8x8: converted
        pruned(nn.Conv2d(8, 8, 3, padding=1, groups=8), 0.1),  # depthwise: no CSR form
        pruned(nn.Conv2d(8, 8, 3, padding=1), 0.5),  # too dense
        nn.Flatten(),
        pruned(nn.Linear(512, 64), MAX_DENSITY - 0.05),  # converted
        pruned(nn.Linear(64, 10), MAX_DENSITY + 0.15),  # too dense
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    deployed = sparsify(copy.deepcopy(model), x)
    assert csr_layers(deployed) == ["1", "5"]
    torch.testing.assert_close(outputs(deployed, x), outputs(model, x), rtol=1e-5, atol=1e-5)
    assert csr_layers(sparsify(copy.deepcopy(model), x, max_density=1.0, max_positions=256)) == ["0", "1", "3", "5", "6"]


def test_a_dense_model_is_left_as_it_is(make_cfg):
    model = models.small_cnn(10, 1).eval()
    deployed = sparse(model, option("quantization", "sparse"), None)
    assert csr_layers(deployed) == [] and deployed is not model
    assert measure.sizes(deployed) == measure.sizes(model)


def test_quantize_then_prune_is_refused_before_anything_trains():
    cfg = compose_cfg("quantization=sparse", "quantization.order=quantize_then_prune")
    with pytest.raises(ConfigError, match=r"^quantization.order=quantize_then_prune is not allowed: must be "
                                          r"prune_then_quantize \(what quantization=sparse supports\)$"):
        validate(cfg)


# --- sizes: CSR as stored ------------------------------------------------------------------------------------------


def test_sizes_count_the_csr_weight_as_stored():
    dense = pruned(nn.Linear(1000, 200), 0.1)
    deployed = nn.Sequential(CsrLinear(dense))
    weight = deployed[0].weight
    nonzero = int(torch.count_nonzero(dense.weight))
    assert weight.values().numel() == nonzero and weight.col_indices().dtype == torch.int32
    buffer = io.BytesIO()
    torch.save(deployed.state_dict(), buffer)
    csr_bytes = nonzero * (4 + 4) + (200 + 1) * 4  # values, int32 column indices, int32 row pointers
    sizes, dense_sizes = measure.sizes(deployed), measure.sizes(nn.Sequential(dense))
    assert sizes["size_mb"] == len(buffer.getvalue()) / 1e6
    assert csr_bytes + 200 * 4 < sizes["size_mb"] * 1e6 < csr_bytes + 200 * 4 + 2500  # + the bias, + framing
    assert sizes["size_mb"] < 0.22 * dense_sizes["size_mb"]  # 0.8 bytes a weight against 4 (measured 0.207)
    # the same weights, so the format-independent sizes and every count are the dense layer's
    for key in ("size_sparse_mb", "size_theoretical_mb"):
        assert sizes[key] == dense_sizes[key]
    assert measure.parameter_counts(deployed) == measure.parameter_counts(nn.Sequential(dense))


# --- copies, state dicts, export -----------------------------------------------------------------------------------


def test_copies_and_state_dicts_keep_the_csr_weights(pruned_cnn):
    x = torch.randn(2, 1, 8, 8)
    deployed = sparsify(copy.deepcopy(pruned_cnn), x[:1])
    twin = copy.deepcopy(deployed)
    assert twin[8].weight.layout == torch.sparse_csr and twin[8].weight is not deployed[8].weight
    buffer = io.BytesIO()
    torch.save(deployed.state_dict(), buffer)
    buffer.seek(0)
    # another model of the same shapes and other non-zeros: load_state_dict replaces its CSR weights
    other = sparsify(unstructured.layer_magnitude(models.small_cnn(10, 1).eval(), OmegaConf.create({"amount": 0.9})),
                     x[:1])
    with pytest.warns(UserWarning, match="Validating sparse tensor invariants"):  # torch's own check, weights_only
        other.load_state_dict(torch.load(buffer, weights_only=True))
    for model in (twin, other):
        torch.testing.assert_close(outputs(model, x), outputs(deployed, x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # see pqsweep.export's doc
# torch.export warns while it fakes the CSR buffer, just before the exporter refuses it
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning")
def test_torchscript_exports_and_onnx_is_a_one_line_error(pruned_cnn, tmp_path):
    x = torch.randn(1, 1, 8, 8)
    deployed = sparsify(copy.deepcopy(pruned_cnn), x)
    cfg = option("quantization", "sparse")
    assert export(deployed, x, "torchscript", tmp_path, cfg)["export_max_abs_diff"] < 1e-5  # batch 1 and 4
    with pytest.raises(ExportError, match=r"^export=onnx failed for quantization=sparse: \w+: .+; use "
                                          r"export=torchscript$"):
        export(deployed, x, "onnx", tmp_path, cfg)
    # what stops ONNX, on a net the legacy exporter would otherwise take (the cnn's adaptive pooling it refuses)
    with pytest.raises(ExportError, match=r": RuntimeError: Sparse CSR tensors do not have strides; use "):
        export(nn.Sequential(CsrLinear(pruned(nn.Linear(30, 4), 0.1))).eval(), torch.randn(1, 30), "onnx", tmp_path, cfg)


# --- the option through the pipeline -------------------------------------------------------------------------------


def test_the_option_runs_through_the_pipeline_on_digits(make_cfg):
    prune = ["pruning=global_magnitude", "pruning.amount=0.9"]
    dense = run(make_cfg(*prune)).metrics
    cfg = make_cfg(*prune, "quantization=sparse")
    assert cfg.quantization.name == "sparse" and cfg.quantization.bits == 32
    metrics = run(cfg).metrics
    assert metrics["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert metrics["top1"] == pytest.approx(dense["top1"], abs=0.3)  # the same pruned model: float summation order
    for key in ("params_total", "params_nonzero", "size_sparse_mb", "size_theoretical_mb", "macs"):
        assert metrics[key] == dense[key], key
    # the layers at most 15 % dense as CSR (both Linear layers, most of the conv weights): measured 0.25 of the file
    assert metrics["size_mb"] < 0.3 * dense["size_mb"]
    assert metrics["reduction_factor"] > 3.3
