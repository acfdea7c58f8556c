"""What measure.py's own tests left open (found by mutation testing): MACs of kernels that are not square, the
thread count of the timed calls, latency in milliseconds, a latency run that silences nothing but torch's CUDA notice,
the gzip size to the byte, the record of every stored tensor (its name, kind, non-zeros and bits) and 2-D buffers that
are not weights."""

from __future__ import annotations

import gzip
import logging
import time

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq

from pqsweep import measure


# --- macs -------------------------------------------------------------------------------------------------------

def test_macs_of_a_non_square_grouped_kernel_by_hand():
    # 3x5 kernels, 4 -> 8 channels in 2 groups, on 10x12: out 8 x 8 x 8, each out element 4/2 * 3 * 5 MACs
    conv = nn.Conv2d(4, 8, kernel_size=(3, 5), groups=2)
    assert measure.macs(nn.Sequential(conv), torch.randn(1, 4, 10, 12)) == 8 * 8 * 8 * (2 * 3 * 5)


# --- latency ----------------------------------------------------------------------------------------------------

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


def test_gzip_size_is_the_gzipped_file_in_megabytes():
    # the definition, byte for byte: the saved state dict, gzip level 9, / 1e6
    model = nn.Sequential(nn.Linear(100, 50))
    expected = len(gzip.compress(measure.serialized(model), compresslevel=9))
    assert measure.sizes(model)["size_gzip_mb"] * 1e6 == pytest.approx(expected, abs=1e-6)


# --- stored_tensors, _describe ----------------------------------------------------------------------------------

# torch.ao's int8 tensors are deprecated in favour of torchao; pqsweep deploys them on purpose (see quantize.py)
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


# --- parameter_counts -------------------------------------------------------------------------------------------

def test_a_model_without_weights_has_sparsity_zero():
    # BatchNorm's affine is 1-D (parameters, not weights), its running statistics neither: nothing to be sparse
    assert measure.parameter_counts(nn.Sequential(nn.BatchNorm1d(4))) == {
        "params_total": 8.0, "params_nonzero": 4.0, "sparsity": 0.0}  # weight 1, bias 0
