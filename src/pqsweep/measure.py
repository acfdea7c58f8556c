"""Measurements of a model as it is stored and as it runs: accuracy, parameters, sparsity, MACs, size, latency.

Definitions (also in docs/metrics.md). "Stored tensors" are the entries of `model.state_dict()` as torch.save writes
them: a torch.ao quantized tensor is its int8 integers plus its scale(s) (float64) and zero point(s) (int64), one
pair per tensor or per output channel; a quantized Linear's packed (weight, bias) tuple counts as its two tensors.
A *weight* is a stored tensor of 2 or more dimensions that is an nn.Parameter, holds integers or is sparse
(Conv/Linear weights, float or int8, including PT2E's int8 weight buffers and quantization=sparse's CSR buffers, which
torch.save writes as their row pointers, column indices and values); a *parameter* is a weight, any other nn.Parameter
(BatchNorm's affine) or a bias (a quantized layer's need not be a Parameter); everything else (BatchNorm running
statistics, quantization scales and zero points) is neither. A weight is zero where its real (dequantized) value is 0.
- size_mb: bytes of `torch.save(model.state_dict())` of the deployable model (int8 weights stored as int8,
  fp16 as fp16, pruning masks already folded in) / 1e6.
- size_gzip_mb: the same bytes after gzip (level 9) / 1e6: what zeros in a dense file buy on disk.
- size_sparse_mb: what a sparse format would store, without file framing, / 1e6: for each weight, its non-zeros at
  their stored element size plus the cheaper of a bitmask (1 bit per weight, rounded up to whole bytes) and one
  int32 flat index per non-zero; every other stored tensor dense at its element size. int32, because it is the
  fixed-width index of common sparse formats (CSR/COO in MKL, cuSPARSE, torch.sparse_csr) and addresses any layer
  below 2^31 weights (VGG-16's largest has 103 M). So the index beats the bitmask only below 1/32 density (above
  96.9 % sparsity), and a dense weight costs its dense bytes plus a bitmask: sparse storage only pays with zeros.
- size_theoretical_mb: non-zero parameters x bits / 8 / 1e6, where bits is the module's `weight_bits` (a fake-quant
  layer storing float32 values that stand for `weight_bits`-bit integers) for weights, else the stored precision
  (int8 -> 8, fp16/bf16 -> 16, fp32 -> 32); no indices, scales, zero points or buffers. The lower bound no real
  format reaches.
- params_total / params_nonzero: parameters (as defined above) and their non-zero values, over the stored model.
- sparsity: zero weights / all weights.
- macs: multiply-accumulates of one batch-1 forward pass of the float network in its Conv2d and Linear layers,
  the count torch's FlopCounterMode gives (dense: unstructured zeros are still computed).
- latency_ms_p50 / p90: batch-1 CPU forward passes after warm-up, timed one call at a time with
  torch.utils.benchmark at a fixed thread count, in eager PyTorch; the same in TorchScript, onnxruntime or
  torch.compile (latency_ms_p50_<runtime>, `measure.runtimes`) is pqsweep.latency's.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: str = "cpu", progress=None) -> dict[str, float]:
    """top-1 and top-5 accuracy in percent."""
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in loader:
        logits = model(x.to(device)).float().cpu()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += len(y)
        if progress is not None:
            progress.update(1)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def serialized(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


INDEX_BYTES = 4  # one int32 flat index per non-zero weight (see size_sparse_mb above)


class Stored(NamedTuple):
    """One stored tensor, as sizes and parameter counts see it."""

    name: str
    values: torch.Tensor  # as stored: the integers of a quantized tensor
    kind: str  # "weight", "param" (another nn.Parameter, or a bias) or "other" (see the module docstring)
    nonzero: int  # values whose real (dequantized) value is not 0
    bits: int  # bits per value it stands for: the owning module's `weight_bits` for weights, else as stored


def stored_tensors(model: nn.Module) -> Iterator[Stored]:
    """Every tensor that `torch.save(model.state_dict())` writes, each once: the one walk behind sizes and counts."""
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)  # keep_vars: Parameters stay Parameters, and the same object twice
    seen: set[int] = set()  # a module shared under two names is stored once
    for key, value in state.items():
        owner = key.rpartition(".")[0]
        for name, tensor in _flatten(key, value):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield from _describe(name, tensor, _weight_bits(modules, owner))


def _flatten(key: str, value) -> Iterator[tuple[str, torch.Tensor]]:
    """torch.ao's quantized Linear stores (weight, bias) as one packed tuple, next to non-tensors such as its dtype."""
    if isinstance(value, (tuple, list)):
        names = ("weight", "bias") if len(value) == 2 else range(len(value))
        for name, item in zip(names, value):
            yield from _flatten(f"{key}.{name}", item)
    elif isinstance(value, torch.Tensor):
        yield key, value


def _weight_bits(modules: dict[str, nn.Module], owner: str) -> int | None:
    """`weight_bits` of the module that owns a tensor, or of the nearest module above it that has one."""
    while True:
        bits = getattr(modules.get(owner), "weight_bits", None)
        if isinstance(bits, int) and not isinstance(bits, bool):
            return bits
        if not owner:
            return None
        owner = owner.rpartition(".")[0]


def _describe(name: str, tensor: torch.Tensor, weight_bits: int | None) -> Iterator[Stored]:
    # A quantized layer's bias is whatever tensor was packed with its weight: a Parameter or not, it is learned.
    learned = isinstance(tensor, nn.Parameter) or name.rpartition(".")[2] == "bias"
    tensor = tensor.detach()
    if tensor.is_quantized:
        values, nonzero = tensor.int_repr(), int(torch.count_nonzero(tensor.dequantize()))
        if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zero_points = tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points()
        else:  # a Python float and int in the pickle: 8 bytes each
            scales = torch.tensor(tensor.q_scale(), dtype=torch.float64)
            zero_points = torch.tensor(tensor.q_zero_point(), dtype=torch.int64)
        for suffix, qparam in (("scales", scales), ("zero_points", zero_points)):
            yield Stored(f"{name}.{suffix}", qparam, "other", int(torch.count_nonzero(qparam)),
                         qparam.element_size() * 8)
    elif tensor.layout != torch.strided:  # a sparse (CSR) weight: numel and element_size are its dense shape's
        values, nonzero = tensor, int(torch.count_nonzero(tensor.values()))
    else:
        values, nonzero = tensor, int(torch.count_nonzero(tensor))
    stored_bits = values.element_size() * 8
    integers = not values.is_floating_point() and values.dtype != torch.bool  # int8 weights; a bool mask is none
    if tensor.dim() >= 2 and (learned or integers or tensor.layout != torch.strided):
        yield Stored(name, values, "weight", nonzero, weight_bits or stored_bits)
    else:
        yield Stored(name, values, "param" if learned else "other", nonzero, stored_bits)


def sizes(model: nn.Module) -> dict[str, float]:
    """size_mb, size_gzip_mb, size_sparse_mb and size_theoretical_mb, as defined in the module docstring."""
    blob = serialized(model)
    sparse = theoretical = 0.0
    for stored in stored_tensors(model):
        if stored.kind == "weight":
            index = min(math.ceil(stored.values.numel() / 8), INDEX_BYTES * stored.nonzero)  # bitmask | indices
            sparse += stored.nonzero * stored.values.element_size() + index
        else:
            sparse += stored.values.numel() * stored.values.element_size()
        if stored.kind != "other":
            theoretical += stored.nonzero * stored.bits / 8
    return {
        "size_mb": len(blob) / 1e6,
        "size_gzip_mb": len(gzip.compress(blob, compresslevel=9)) / 1e6,
        "size_sparse_mb": sparse / 1e6,
        "size_theoretical_mb": theoretical / 1e6,
    }


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Counts over the stored model, quantized layers included (their weights are not nn.Parameters)."""
    total = nonzero = weights = zero_weights = 0
    for stored in stored_tensors(model):
        if stored.kind == "other":
            continue
        total += stored.values.numel()
        nonzero += stored.nonzero
        if stored.kind == "weight":
            weights += stored.values.numel()
            zero_weights += stored.values.numel() - stored.nonzero
    return {
        "params_total": float(total),
        "params_nonzero": float(nonzero),
        "sparsity": zero_weights / weights if weights else 0.0,
    }


def macs(model: nn.Module, example: torch.Tensor) -> float:
    """Dense multiply-accumulates of one forward pass of the float model, counted where they are done: every
    Conv2d (out elements x in_channels / groups x kernel area) and Linear (out elements x in_features).

    The same count as torch's FlopCounterMode / 2 on these models (a test checks it on every one), without its
    cost: it imports torch._dynamo (~1-2 s) on first use, more than a whole run on digits spends measuring."""
    total = 0

    def count(module: nn.Module, args, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        total += output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return float(total)


def latency(model: nn.Module, example: torch.Tensor, threads: int, warmup: int, repeats: int) -> dict[str, float]:
    """Batch-1 CPU latency in ms: `warmup` untimed calls, then `repeats` calls timed one by one."""
    # torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on CPU-only machines;
    # we compile nothing, so that warning says nothing about this measurement.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    model.eval()
    timer = benchmark.Timer(
        stmt="model(x)", globals={"model": model, "x": example}, num_threads=threads, setup="import torch"
    )
    with torch.no_grad():
        timer.timeit(warmup)
        times = np.array([timer.timeit(1).times[0] for _ in range(repeats)]) * 1e3
    return {
        "latency_ms_p50": float(np.percentile(times, 50)),
        "latency_ms_p90": float(np.percentile(times, 90)),
        "latency_threads": float(threads),
    }
