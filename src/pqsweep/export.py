"""Writes the deployable model as ONNX or TorchScript, reloads it in its own runtime and checks its outputs.

`export(model, example, fmt, directory, quantization)` writes `directory/model.onnx` (run by onnxruntime) or `directory/model.pt`
(run by torch.jit.load), feeds the reloaded file the example and, when the file takes any batch size, a batch of
four, and returns {"export_max_abs_diff": max |reloaded - eager|}. It raises ExportError (one line, naming
`export=` and `quantization=` and what to use instead) when a model kind cannot be exported or reloaded, or when
its outputs differ by more than the quantization option's `export_tolerance`.

What exports (torch 2.14, onnx 1.23, onnxruntime 1.31; each cell measured on small_cnn / resnet18_cifar):
- fp32 (pruned or structurally smaller alike), fp16, fake_quant, static_int8 backend=pt2e: onnx (torch.export-based
  exporter) and torchscript. For pt2e both files hold its int8 reference graph (int8 weights, dequantize -> float
  Conv/Linear, quantize/dequantize around activations; onnxruntime fuses the ONNX Q/DQ pairs into int8 kernels), not
  the oneDNN-lowered graph it runs here, whose packed weights neither format can hold. Loading pt2e's TorchScript file
  elsewhere needs its ops registered first: `import torch.ao.quantization.fx._decomposed`.
- bf16: torchscript only; the ONNX file is written, but onnxruntime has no bfloat16 Conv kernel on CPU.
- torch.ao FX int8 (static_int8 backend=fx, qat_int8, mixed): torchscript; onnx only through the legacy
  TorchScript-based exporter (torch.export cannot trace torch.ao's packed weights), which has int8 Q/DQ rules but
  refuses adaptive_avg_pool2d to a size that does not divide its input (small_cnn at 8 or 28 px; VGG at 32 px).
- dynamic_int8: torchscript only (neither ONNX exporter has a rule for quantized::linear_dynamic).
TorchScript (torch.jit.trace) is deprecated in favour of torch.export but is still the one format that saves every
kind here, torch.ao's int8 modules included, in a file that torch.jit.load runs without the Python code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

FORMATS = ("onnx", "torchscript")


class ExportError(RuntimeError):
    """A model that cannot be exported in the format asked for, or whose file does not reproduce its outputs."""


def export(model: nn.Module, example: torch.Tensor, fmt: str, directory: str | Path, quantization) -> dict[str, float]:
    """Write `model` in `fmt` to `directory`, reload it, check it against the eager model; see the module doc.

    `quantization` is the run's quantization config: its `name` for messages, and its `export_tolerance`, the
    largest max |reloaded - eager| / max(1, max |eager logit|) its precision allows (a share of the logit scale,
    floored at 1 so that the near-zero logits of an untrained net do not demand a tighter match than a trained one).
    """
    if fmt not in FORMATS:
        raise ValueError(f"export={fmt} is not allowed: must be one of none, {', '.join(FORMATS)}")
    other = next(f for f in FORMATS if f != fmt)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    example = example.detach().cpu().float()
    try:
        with torch.no_grad(), quiet():
            reloaded = _WRITERS[fmt](model, example, directory)
            diff, scale = _compare(model, reloaded, example)
    except Exception as error:
        raise ExportError(f"export={fmt} failed for quantization={quantization.name}: {reason(error)}; "
                          f"use export={other}") from error
    tolerance = float(quantization.export_tolerance)
    if diff > tolerance * scale:
        raise ExportError(f"export={fmt}, quantization={quantization.name}: the reloaded file's logits differ from the "
                          f"eager model's by {diff:.3g}, more than its export_tolerance {tolerance:g} x logit scale "
                          f"{scale:.3g}; use export={other}")
    return {"export_max_abs_diff": diff}


Runner = Callable[[torch.Tensor], "torch.Tensor | None"]  # None: the file does not take this batch size


def _compare(model: nn.Module, reloaded: Runner, example: torch.Tensor) -> tuple[float, float]:
    """(max |reloaded - eager|, logit scale) over the example and, where the file takes it, a batch of four."""
    # Four real-looking inputs: the example and three mirror images/shifts of it, so int8 ranges stay the data's.
    four = torch.cat([example, example.flip(-1), example.flip(-2), example.roll(1, -1)])
    diff, scale = 0.0, 1.0
    for batch in (example, four):
        out = reloaded(batch)
        if out is None:
            continue
        expected = model(batch).float()
        diff = max(diff, (out.float() - expected).abs().max().item())
        scale = max(scale, expected.abs().max().item())
    return diff, scale


def onnx_file(model: nn.Module, example: torch.Tensor, directory: Path) -> Path:
    """`directory/model.onnx`, written by the exporter that can (see the module doc); pqsweep.latency runs it too."""
    path = Path(directory) / "model.onnx"
    # One self-contained file (the exporter would put the weights in model.onnx.data); every model here is < 2 GB.
    names = {"input_names": ["input"], "output_names": ["logits"], "external_data": False, "verbose": False}
    graph = _writable(model)
    try:
        try:
            torch.onnx.export(graph, (example,), path, dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
        except Exception:  # a graph exported for one batch size (a plain PT2E graph) keeps it
            torch.onnx.export(graph, (example,), path, **names)
    except Exception:
        # torch.export cannot trace torch.ao's packed-weight ScriptObjects (FX and dynamic int8); the legacy
        # TorchScript-based exporter has int8 rules for them. Its failure (if any) is the one reported.
        with _stdout_to_devnull():  # it prints the whole TorchScript graph when it fails
            torch.onnx.export(graph, (example,), path, dynamo=False, dynamic_axes={"input": {0: "batch"}}, **names)
    return path


def _onnx(model: nn.Module, example: torch.Tensor, directory: Path) -> Runner:
    import onnx
    import onnxruntime

    path = onnx_file(model, example, directory)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dynamic = bool(onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param)

    def run(batch: torch.Tensor) -> torch.Tensor | None:
        if len(batch) != len(example) and not dynamic:
            return None
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])

    return run


def traced(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The model as TorchScript, the format that holds every kind here (see the module doc)."""
    with torch.no_grad(), quiet():
        return torch.jit.trace(_writable(model), example.detach().cpu().float())


def _torchscript(model: nn.Module, example: torch.Tensor, directory: Path) -> Runner:
    path = directory / "model.pt"
    torch.jit.save(traced(model, example), str(path))
    loaded = torch.jit.load(str(path))

    def run(batch: torch.Tensor) -> torch.Tensor | None:
        if len(batch) == len(example):
            return loaded(batch)
        try:
            model(batch)  # a model exported for one batch size (a plain PT2E graph) refuses others itself
        except Exception:
            return None
        return loaded(batch)

    return run


_WRITERS = {"onnx": _onnx, "torchscript": _torchscript}


def _writable(model: nn.Module) -> nn.Module:
    """A model that runs something other than what it stores offers `exportable()`: Int8Pt2e runs a oneDNN-lowered graph whose packed weights are opaque; its int8 reference graph is the model,
    in the form it is lowered from (literal activation scales: the ONNX rule for quantize_per_tensor takes no
    tensor scale; per-tensor weights written per channel). pt2e owns that form; we only write it out."""
    if not callable(getattr(model, "exportable", None)):
        return model
    graph = model.exportable()  # a copy
    # An exported graph refuses .eval() (its ops do not switch with the mode; BatchNorm is folded in) and so stays
    # in training mode, which the ONNX exporter warns about; the flag changes nothing it computes.
    for module in graph.modules():
        module.training = False
    return graph


@contextlib.contextmanager
def _stdout_to_devnull():
    """Silence C++ writes to stdout (file descriptor 1), which Python's redirect_stdout does not catch."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def reason(error: BaseException) -> str:
    """The first line of the innermost cause: exporters wrap the message that says what went wrong."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's boilerplate after the reason ("Please feel free to request support ...", the IR value) says nothing
    first = re.split(r"\s*(?:Please feel free|\[Caused by)", lines[0])[0] if lines else ""
    return f"{type(error).__name__}: {first if len(first) <= 300 else first[:297] + '...'}"


class quiet(warnings.catch_warnings):
    """Warnings that say nothing about this export: we check the reloaded file's outputs instead."""

    def __enter__(self):
        super().__enter__()
        # torch.jit and the legacy ONNX exporter are deprecated (see the module doc for why we still use them).
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        # Tracing turns quantization scales and zero points into constants: after conversion they are constants.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The torch.export-based ONNX exporter logs every optimisation pass at INFO (one line per Q/DQ node); under
        # Hydra's INFO root logger that buries the run's own log. Its warnings and errors still show.
        self._levels = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return super().__exit__(*exc)


_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")
