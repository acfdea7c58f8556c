"""The four sizes on hand-made models with known answers, the record of every stored tensor they count (its name,
kind, non-zeros and bits), MACs and latency (in milliseconds, at the asked thread count, silencing only torch's CUDA
notice), and export: files that reproduce, refusals that explain."""

from __future__ import annotations

import copy
import gzip
import logging
import math
import time
from pathlib import Path

import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.ao.nn import quantized as nnq

from pqsweep import measure, models
from pqsweep.export import ExportError, export
from pqsweep.pruning import unstructured

from nets import batches, compose_cfg, context, quantize

IN, OUT = 100, 50  # Linear(100, 50): 5000 weights, a 625-byte bitmask, 50 biases


def deploy(name: str, model: nn.Module, images: list[torch.Tensor], *overrides: str) -> nn.Module:
    """The real `quantization=<name>` option, as the pipeline calls it, calibrated on `images`."""
    return quantize(name, model, context([(x, torch.zeros(len(x), dtype=torch.long)) for x in images]), *overrides)


def sparse_linear(nonzero: int, seed: int = 0) -> nn.Sequential:
    """Linear(100, 50) with exactly `nonzero` weights of magnitude 0.5..1 (so none rounds to 0 in int8) and
    biases all non-zero."""
    torch.manual_seed(seed)
    layer = nn.Linear(IN, OUT)
    with torch.no_grad():
        values = (torch.rand(IN * OUT) * 0.5 + 0.5) * torch.sign(torch.randn(IN * OUT))
        values[torch.randperm(IN * OUT)[nonzero:]] = 0
        layer.weight.copy_(values.view(OUT, IN))
        layer.bias.copy_(torch.rand(OUT) + 0.1)
    return nn.Sequential(layer).eval()


def in_bytes(sizes: dict[str, float]) -> dict[str, float]:
    return {key: round(value * 1e6, 3) for key, value in sizes.items()}


# --- sizes, by hand ---------------------------------------------------------------------------------------------

BITMASK = math.ceil(IN * OUT / 8)  # 625 bytes


@pytest.mark.parametrize("nonzero, index", [
    (500, BITMASK),  # 10 % dense: 500 int32 indices would take 2000 bytes, the bitmask 625
    (100, 4 * 100),  # 2 % dense: 400 bytes of indices beat the bitmask
    (IN * OUT, BITMASK),  # dense: the bitmask still has to be stored
])
def test_fp32_sizes_by_hand(nonzero, index):
    sizes = in_bytes(measure.sizes(sparse_linear(nonzero)))
    assert sizes["size_sparse_mb"] == nonzero * 4 + index + OUT * 4
    assert sizes["size_theoretical_mb"] == nonzero * 4 + OUT * 4


def test_fp16_stores_two_bytes_per_value():
    sizes = in_bytes(measure.sizes(deploy("fp16", sparse_linear(500), [])))
    assert sizes["size_sparse_mb"] == 500 * 2 + BITMASK + OUT * 2
    assert sizes["size_theoretical_mb"] == 500 * 2 + OUT * 2


def test_gzip_size_is_the_gzipped_file_in_megabytes():
    # the definition, byte for byte: the saved state dict, gzip level 9, / 1e6
    model = nn.Sequential(nn.Linear(100, 50))
    expected = len(gzip.compress(measure.serialized(model), compresslevel=9))
    assert measure.sizes(model)["size_gzip_mb"] * 1e6 == pytest.approx(expected, abs=1e-6)


# Besides the weight and bias, torch.ao's static int8 Linear stores: the input's scale (float32, 4 bytes) and zero
# point (int64, 8), the same pair for its output, and the weight's own scale (float64, 8) and zero point (int64, 8),
# one pair per tensor or, per channel, one pair per output row.
@pytest.mark.parametrize("granularity, qparams", [
    ("per_tensor", 2 * (4 + 8) + (8 + 8)),
    ("per_channel", 2 * (4 + 8) + OUT * (8 + 8)),
])
def test_static_int8_sizes_by_hand(granularity, qparams):
    model = deploy("static_int8", sparse_linear(500), [torch.randn(8, IN)], f"granularity={granularity}")
    sizes = in_bytes(measure.sizes(model))
    assert sizes["size_sparse_mb"] == 500 * 1 + BITMASK + OUT * 4 + qparams  # int8 weights, float32 biases
    assert sizes["size_theoretical_mb"] == 500 * 1 + OUT * 4  # no index, no scales
    assert measure.parameter_counts(model) == {"params_total": IN * OUT + OUT, "params_nonzero": 500 + OUT,
                                               "sparsity": 0.9}


def test_zero_is_the_dequantized_value():
    # an affine int8 weight stores 0.0 as its zero point (here 5), not as the integer 0
    layer = nnq.Linear(IN, OUT)
    weight = sparse_linear(500)[0].weight.detach()
    layer.set_weight_bias(torch.quantize_per_tensor(weight, 0.01, 5, torch.qint8), torch.ones(OUT))
    assert measure.parameter_counts(nn.Sequential(layer))["params_nonzero"] == 500 + OUT


# torch.ao's int8 tensors are deprecated in favour of torchao; pqsweep deploys them on purpose (see pqsweep.quantization.engine)
@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*are deprecated")
def test_the_record_of_a_static_int8_linear_by_hand():
    # every tensor torch.save writes, named by its state-dict key (the packed (weight, bias) tuple as its two
    # tensors, the weight's scale and zero point after it), each with its kind, non-zeros and bits as stored
    layer = nnq.Linear(6, 4)
    weight = torch.tensor([[0.0, 0.5, -0.5, 0.0, 0.25, 0.0]] * 4)  # 3 non-zeros a row, 12 in all
    layer.set_weight_bias(torch.quantize_per_tensor(weight, 0.05, 5, torch.qint8), torch.tensor([1.0, 0.0, 2.0, 3.0]))
    packed = "0._packed_params._packed_params"
    assert [(s.name, s.kind, s.nonzero, s.bits) for s in measure.stored_tensors(nn.Sequential(layer))] == [
        ("0.scale", "other", 1, 32),  # the output's scale, float32 (1.0)
        ("0.zero_point", "other", 0, 64),  # and zero point, int64 (0)
        (f"{packed}.weight.scales", "other", 1, 64),  # a Python float in the pickle: 8 bytes
        (f"{packed}.weight.zero_points", "other", 1, 64),  # 5, a Python int: 8 bytes
        (f"{packed}.weight", "weight", 12, 8),  # int8 integers; zero where the dequantized value is 0
        (f"{packed}.bias", "param", 3, 32),  # not an nn.Parameter, but learned
    ]


class WithTables(nn.Module):
    """A Linear next to two 2-D buffers that are not weights: a fixed float table (all zeros) and a bool mask."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.register_buffer("table", torch.zeros(8, 8))
        self.register_buffer("mask", torch.zeros(8, 8, dtype=torch.bool))

    def forward(self, x):
        return self.layer(x) @ self.table


def test_a_float_buffer_and_a_bool_mask_are_not_weights():
    # zeros in a buffer are not pruned weights: only the Linear's count, so a dense model has sparsity 0
    model = WithTables()
    kinds = {s.name: s.kind for s in measure.stored_tensors(model)}
    assert kinds == {"layer.weight": "weight", "layer.bias": "param", "table": "other", "mask": "other"}
    assert measure.parameter_counts(model) == {"params_total": 8 * 8 + 8, "params_nonzero": 8 * 8 + 8,
                                               "sparsity": 0.0}


def test_a_model_without_weights_has_sparsity_zero():
    # BatchNorm's affine is 1-D (parameters, not weights), its running statistics neither: nothing to be sparse
    assert measure.parameter_counts(nn.Sequential(nn.BatchNorm1d(4))) == {
        "params_total": 8.0, "params_nonzero": 4.0, "sparsity": 0.0}  # weight 1, bias 0


class WeightBits(nn.Module):
    """A fake-quant wrapper of the kind fake_quant writes: float32 storage, `weight_bits` on the wrapped layer
    (or, with `on_wrapper`, on the wrapper itself)."""

    def __init__(self, layer: nn.Module, bits: int, on_wrapper: bool = False):
        super().__init__()
        self.layer = layer
        (self if on_wrapper else layer).weight_bits = bits
        self.register_buffer("input_scale", torch.tensor(0.1))

    def forward(self, x):
        return self.layer(torch.round(x / self.input_scale) * self.input_scale)


@pytest.mark.parametrize("on_wrapper", [False, True])
def test_weight_bits_set_the_theoretical_size(on_wrapper):
    model = nn.Sequential(WeightBits(sparse_linear(500)[0], bits=4, on_wrapper=on_wrapper))
    sizes = in_bytes(measure.sizes(model))
    assert sizes["size_theoretical_mb"] == 500 * 0.5 + OUT * 4  # 4-bit weights; the float32 bias as stored
    assert sizes["size_sparse_mb"] == 500 * 4 + BITMASK + OUT * 4 + 4  # what is stored: float32, and the scale


def test_fake_quant_sizes_count_its_bits(digits_batches):
    model = unstructured.global_magnitude(models.small_cnn(10, 1), OmegaConf.create({"amount": 0.9}))
    deployed = deploy("fake_quant", model, digits_batches, "bits_w=4")
    layers = [m for m in deployed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = sum(int(torch.count_nonzero(m.weight)) for m in layers)
    biases = sum(int(torch.count_nonzero(m.bias)) for m in layers)
    assert measure.sizes(deployed)["size_theoretical_mb"] * 1e6 == pytest.approx(weights * 4 / 8 + biases * 4)


def test_pt2e_int8_weight_buffers_are_weights(digits_batches):
    model = unstructured.global_magnitude(models.small_cnn(10, 1), OmegaConf.create({"amount": 0.9}))
    deployed = deploy("static_int8", model, digits_batches, "backend=pt2e")
    weights = [t for t in deployed.state_dict().values() if t.dtype == torch.int8]
    assert len(weights) == 4  # int8 buffers, not nn.Parameters
    counts = measure.parameter_counts(deployed)
    assert counts["params_total"] == measure.parameter_counts(model)["params_total"]
    assert counts["sparsity"] == pytest.approx(0.9, abs=0.005)
    biases = sum(int(torch.count_nonzero(p)) for p in deployed.parameters())
    theoretical = sum(int(torch.count_nonzero(w)) for w in weights) * 1 + biases * 4
    assert measure.sizes(deployed)["size_theoretical_mb"] * 1e6 == pytest.approx(theoretical)


def test_a_shared_layer_is_counted_once():
    layer = nn.Linear(IN, IN)
    assert measure.parameter_counts(nn.Sequential(layer, nn.ReLU(), layer))["params_total"] == IN * IN + IN


def test_sparse_size_pays_only_with_zeros():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(512, 512))  # a 32 KB bitmask: more than torch.save's framing
    sparse = unstructured.global_magnitude(copy.deepcopy(dense), OmegaConf.create({"amount": 0.9}))
    dense_sizes, sparse_sizes = in_bytes(measure.sizes(dense)), in_bytes(measure.sizes(sparse))
    weights, kept, bitmask = 512 * 512, round(0.1 * 512 * 512), 512 * 512 // 8
    assert dense_sizes["size_sparse_mb"] == weights * 4 + bitmask + 512 * 4 > dense_sizes["size_mb"]  # plus a bitmask
    assert sparse_sizes["size_sparse_mb"] == kept * 4 + bitmask + 512 * 4  # 10 % of the values, 1 bit per weight
    assert sparse_sizes["size_theoretical_mb"] == kept * 4 + 512 * 4
    assert sparse_sizes["size_mb"] == dense_sizes["size_mb"]  # torch.save stores the zeros


# --- macs and latency -------------------------------------------------------------------------------------------


def test_macs_of_a_non_square_grouped_kernel_by_hand():
    # 3x5 kernels, 4 -> 8 channels in 2 groups, on 10x12: out 8 x 8 x 8, each out element 4/2 * 3 * 5 MACs
    conv = nn.Conv2d(4, 8, kernel_size=(3, 5), groups=2)
    assert measure.macs(nn.Sequential(conv), torch.randn(1, 4, 10, 12)) == 8 * 8 * 8 * (2 * 3 * 5)


class ThreadsSeen(nn.Module):
    """Records torch's intra-op thread count at every call."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.threads: list[int] = []

    def forward(self, x):
        self.threads.append(torch.get_num_threads())
        return self.layer(x)


def test_latency_runs_every_timed_call_at_the_asked_thread_count():
    model = ThreadsSeen()
    before = torch.get_num_threads()
    threads = 2 if before != 2 else 3  # not the process's own count, so the timer has to set it
    measure.latency(model, torch.randn(1, 8), threads=threads, warmup=2, repeats=3)
    assert model.threads and set(model.threads) == {threads}
    assert torch.get_num_threads() == before


def test_latency_changes_no_other_logger():
    root = logging.getLogger()
    level = root.level
    measure.latency(nn.Linear(8, 8), torch.randn(1, 8), threads=1, warmup=1, repeats=2)
    assert root.level == level  # silencing cpp_extension's notice must not silence the app's own warnings


def test_latency_silences_the_cuda_notice_of_cpp_extension(caplog):
    # torch.utils.benchmark imports cpp_extension, which logs "No CUDA runtime is found" on CPU-only machines (once,
    # at its first import, so the logger is checked here rather than the import's output): we compile nothing.
    measure.latency(nn.Linear(8, 8), torch.randn(1, 8), threads=1, warmup=1, repeats=2)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
        logging.getLogger("pqsweep").warning("the app's own warning")
    assert [r.getMessage() for r in caplog.records] == ["the app's own warning"]


class Sleeps(nn.Module):
    """A forward pass of a known 20 ms."""

    def forward(self, x):
        time.sleep(0.02)
        return x


def test_latency_is_in_milliseconds_per_call():
    result = measure.latency(Sleeps(), torch.randn(1, 8), threads=1, warmup=1, repeats=3)
    # 20 ms of sleep per call; the OS wakes the process late by well under a few ms (measured 20.1)
    assert 19.9 <= result["latency_ms_p50"] <= result["latency_ms_p90"] < 40


# --- every deployable kind --------------------------------------------------------------------------------------

KINDS = {  # the kind of model the project deploys -> (quantization option, its overrides)
    "fp32": ("none", []),
    "fp16": ("fp16", []),
    "bf16": ("bf16", []),
    "static_int8": ("static_int8", []),
    "static_int8_per_tensor": ("static_int8", ["granularity=per_tensor"]),
    "dynamic_int8": ("dynamic_int8", []),
    "pt2e": ("static_int8", ["backend=pt2e"]),
    "fake_quant": ("fake_quant", ["bits_w=4"]),
}


def option(kind: str):
    """The quantization config a run of that kind has (export reads its name and export_tolerance)."""
    name, overrides = KINDS[kind]
    return compose_cfg(f"quantization={name}", *(f"quantization.{o}" for o in overrides)).quantization


@pytest.fixture(scope="module")
def digits_batches(digits) -> list[torch.Tensor]:
    """Two batches of 64 digits images, as the pipeline normalises them."""
    return [x for x, _ in batches(digits.train, 2)]


@pytest.fixture(scope="module")
def pruned_cnn() -> nn.Module:
    torch.manual_seed(0)
    return unstructured.global_magnitude(models.small_cnn(10, 1).eval(), OmegaConf.create({"amount": 0.9}))


@pytest.fixture(scope="module")
def deployed(pruned_cnn, digits_batches) -> dict[str, nn.Module]:
    """small_cnn at 90 % sparsity, deployed by each kind."""
    return {kind: deploy(name, pruned_cnn, digits_batches, *overrides) for kind, (name, overrides) in KINDS.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_orders_its_sizes(deployed, kind):
    sizes = measure.sizes(deployed[kind])
    # at 90 % sparsity: no index is cheaper than none, and a sparse format beats storing zeros densely
    assert 0 < sizes["size_theoretical_mb"] < sizes["size_sparse_mb"] < sizes["size_mb"]
    assert measure.parameter_counts(deployed[kind])["sparsity"] >= 0.9 - 1e-3


def test_structural_pruning_shrinks_every_size():
    torch.manual_seed(0)
    wide, narrow = nn.Sequential(nn.Linear(IN, OUT)), nn.Sequential(nn.Linear(IN, OUT // 2))
    for key, value in measure.sizes(narrow).items():
        # half the weights and biases: 0.50 of every size but the file's, whose framing stays (measured 0.54)
        assert value < 0.55 * measure.sizes(wide)[key], key


# --- export -----------------------------------------------------------------------------------------------------

SUPPORTED = [  # (kind, format) pairs that write a file that reproduces the eager outputs
    ("fp32", "onnx"), ("fp32", "torchscript"),
    ("fp16", "onnx"), ("fp16", "torchscript"),
    ("bf16", "torchscript"),
    ("static_int8", "torchscript"), ("static_int8_per_tensor", "torchscript"),
    ("dynamic_int8", "torchscript"),
    ("pt2e", "onnx"), ("pt2e", "torchscript"),
    ("fake_quant", "onnx"), ("fake_quant", "torchscript"),
]


def reload(path: Path):
    if path.suffix == ".onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    from torch.ao.quantization.fx import _decomposed  # noqa: F401  registers the ops of pt2e's reference graph

    return torch.jit.load(str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # see pqsweep.export's doc
@pytest.mark.parametrize("kind, fmt", SUPPORTED)
def test_exported_file_reproduces_the_outputs(deployed, digits_batches, tmp_path, kind, fmt):
    model = deployed[kind]
    result = export(model, digits_batches[0][:1], fmt, tmp_path, option(kind))
    assert set(result) == {"export_max_abs_diff"}
    # reloaded here, independently of export's own check, on eight other images at once
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    images = digits_batches[1][:8]
    with torch.no_grad():
        expected, got = model(images), reload(path)(images).float()
    tolerance = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}.get(kind, 1e-1) * max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= tolerance
    assert result["export_max_abs_diff"] <= tolerance


def test_a_structurally_pruned_model_exports_smaller(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, IN)
    sizes = {}
    for width in (OUT, OUT // 2):
        model = nn.Sequential(nn.Linear(IN, width), nn.ReLU(), nn.Linear(width, 10)).eval()
        assert export(model, x, "onnx", tmp_path / str(width), option("fp32"))["export_max_abs_diff"] < 1e-5
        sizes[width] = (tmp_path / str(width) / "model.onnx").stat().st_size
    assert sizes[OUT // 2] < 0.6 * sizes[OUT]  # half the weights; the graph's own bytes stay (measured 0.58)


@pytest.mark.parametrize("kind", ["bf16", "dynamic_int8", "static_int8"])
def test_unsupported_export_is_a_one_line_error(deployed, digits_batches, tmp_path, kind):
    # bf16: onnxruntime has no bfloat16 Conv on CPU; torch.ao int8: neither exporter takes all of small_cnn
    name = KINDS[kind][0]
    with pytest.raises(ExportError, match=rf"^export=onnx failed for quantization={name}: \w+: .+; use export=torchscript$") \
            as error:
        export(deployed[kind], digits_batches[0][:1], "onnx", tmp_path, option(kind))
    assert "\n" not in str(error.value)


class BatchDependent(nn.Module):
    """Doubles its output for batches of more than one: a trace at batch 1 bakes in the other branch."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(IN, 10)

    def forward(self, x):
        return self.layer(x) * (2 if x.shape[0] > 1 else 1)


def test_a_file_that_does_not_reproduce_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"^export=torchscript, quantization=none: the reloaded file's logits differ"):
        export(BatchDependent().eval(), torch.randn(1, IN), "torchscript", tmp_path, option("fp32"))


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"export=tflite is not allowed: must be one of none, onnx, torchscript"):
        export(nn.Linear(2, 2), torch.randn(1, 2), "tflite", tmp_path, option("fp32"))
