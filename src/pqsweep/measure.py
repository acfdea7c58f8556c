"""Measurements of a model as it is stored and as it runs: accuracy, parameters, sparsity, MACs, size, latency.

Definitions (also in the README):
- size_mb: bytes of `torch.save(model.state_dict())` of the deployable model (int8 weights stored as int8,
  fp16 as fp16, pruning masks already folded in) / 1e6.
- size_gzip_mb: the same bytes after gzip (level 9) / 1e6: what zeros in a dense file buy on disk.
- sparsity: zero weights / all weights, over the prunable (Conv2d, Linear) weights of the stored model.
- macs: multiply-accumulates of one batch-1 forward pass of the float network, from torch's FlopCounterMode
  (dense: unstructured zeros are still computed).
- latency_ms_p50 / p90: batch-1 CPU forward passes after warm-up, timed one call at a time with
  torch.utils.benchmark at a fixed thread count.
"""

from __future__ import annotations

import gzip
import io
import logging

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode


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


def sizes(model: nn.Module) -> dict[str, float]:
    blob = serialized(model)
    return {"size_mb": len(blob) / 1e6, "size_gzip_mb": len(gzip.compress(blob, compresslevel=9)) / 1e6}


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The weight as stored: int8 integers for quantized layers, the tensor itself otherwise."""
    weight = getattr(module, "weight", None)
    if callable(weight):  # torch.ao quantized Conv/Linear expose weight() returning a quantized tensor
        weight = weight()
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    return weight.int_repr() if weight.is_quantized else weight


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Counts over the stored model, quantized layers included (their weights are not nn.Parameters)."""
    total = nonzero = prunable = prunable_zero = 0
    seen: set[int] = set()
    for module in model.modules():
        weight = _weight(module)
        if weight is not None and id(module) not in seen:
            seen.add(id(module))
            zeros = int((weight == 0).sum())
            prunable += weight.numel()
            prunable_zero += zeros
            total += weight.numel()
            nonzero += weight.numel() - zeros
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and weight is not None:
                continue
            total += param.numel()
            nonzero += int((param != 0).sum())
        bias = getattr(module, "bias", None)
        if callable(bias):
            bias = bias()
            if isinstance(bias, torch.Tensor):
                total += bias.numel()
                nonzero += int((bias != 0).sum())
    return {
        "params_total": float(total),
        "params_nonzero": float(nonzero),
        "sparsity": prunable_zero / prunable if prunable else 0.0,
    }


def macs(model: nn.Module, example: torch.Tensor) -> float:
    """Dense multiply-accumulates of one forward pass of the float model (FLOPs / 2)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() / 2


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
