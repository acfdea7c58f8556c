"""Batch-1 latency of a deployed model in each runtime `measure.runtimes` names besides eager (pqsweep.runtimes),
timed exactly as eager is (pqsweep.measure.latency: `warmup` untimed calls, then `repeats` calls timed one at a time
by torch.utils.benchmark at `threads` threads), after a check that the runtime computes what the eager model does.

    metrics, tags = latency.measure(deployed, example, ["eager", "onnxruntime"], threads=1, warmup=20, repeats=200)
    # metrics: {"latency_ms_p50_onnxruntime": ..., "latency_ms_p90_onnxruntime": ...}
    # tags: {"runtime.onnxruntime": "onnxruntime 1.32.0 CPUExecutionProvider, 1 intra-op thread(s)"}

A runtime that cannot run the model (ONNX holds no sparse CSR tensor; torch.ao's dynamic int8 has no ONNX rule; an
output that differs from eager's by more than `tolerance` of the logit scale) is no failure of the trial: its metrics
are absent and its tag says why ("n/a: <reason>"). What is timed is the runtime's own call on what it takes as input
(a numpy array for onnxruntime), so a runtime's conversion cost at the boundary is not charged to the model.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pqsweep import export
from pqsweep.runtimes import EAGER, NOT_AVAILABLE, missing, p50, p90, tag

log = logging.getLogger(__name__)
REASON_CHARS = 300  # a tag's reason: long enough to be understood, short enough for a table's tooltip


class Unavailable(RuntimeError):
    """A runtime that cannot run this model; the message is the short reason the report shows."""


# A prepared runtime: (call, input it takes, what ran it). `call(input)` returns the logits as a torch tensor or an
# array; the input is the example in the form the runtime takes, so converting it is not timed.
Prepared = tuple[Callable[[Any], Any], Any, str]


def _sparse(model: nn.Module) -> bool:
    return any(t.layout != torch.strided for t in [*model.parameters(), *model.buffers()])


def _torchscript(model: nn.Module, example: torch.Tensor, threads: int, directory: Path) -> Prepared:
    return export.traced(model, example), example, f"torch {torch.__version__} torch.jit.trace"


def _onnxruntime(model: nn.Module, example: torch.Tensor, threads: int, directory: Path) -> Prepared:
    if _sparse(model):  # both ONNX exporters refuse it ("Sparse CSR tensors do not have strides"); say so at once
        raise Unavailable("no sparse CSR in ONNX")
    import onnxruntime

    with torch.no_grad(), export.quiet():
        path = export.onnx_file(model, example.detach().cpu().float(), directory)
    options = onnxruntime.SessionOptions()
    # measure.threads, as torch gets it; one inter-op thread, as torch's Timer runs one call at a time
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only: its warnings about unused initializers say nothing about speed
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name, inputs = session.get_inputs()[0].name, example.detach().cpu().float().numpy()
    provider = f"onnxruntime {onnxruntime.__version__} {session.get_providers()[0]}, {threads} intra-op thread(s)"
    return (lambda x: session.run(None, {name: x})[0]), inputs, provider


def _compile(model: nn.Module, example: torch.Tensor, threads: int, directory: Path) -> Prepared:
    import torch._dynamo

    # Dynamo keys its compiled code by the forward's code object: every trial's model shares it, and past its
    # recompile limit (8) it would silently run eager. Each measurement starts from an empty cache instead.
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found": CPU here
    # Dynamo warns once per torch.ao quantized op it cannot trace ("quantized nyi in meta tensors") and runs that
    # part eager: the tag says how many such breaks the measured graph has, so the warning is not needed.
    dynamo_log = logging.getLogger("torch._dynamo")
    level, before = dynamo_log.level, sum(counters["graph_break"].values())
    dynamo_log.setLevel(logging.ERROR)
    try:
        compiled = torch.compile(model, backend="inductor", fullgraph=False)
        with torch.no_grad():
            compiled(example)  # compiles now: its failure is this runtime's, and its time is not the model's latency
    finally:
        dynamo_log.setLevel(level)
    breaks = sum(counters["graph_break"].values()) - before
    eager_parts = f", {breaks} graph break(s): those parts run eager" if breaks else ""
    return compiled, example, f"torch {torch.__version__} torch.compile (inductor, CPU{eager_parts})"


PREPARE: dict[str, Callable[..., Prepared]] = {"torchscript": _torchscript, "onnxruntime": _onnxruntime,
                                               "compile": _compile}


def _check(model: nn.Module, call: Callable, inputs: Any, example: torch.Tensor, tolerance: float) -> None:
    """The runtime's logits on the example are the eager model's, within `tolerance` of the logit scale (as export
    checks a file: pqsweep.export)."""
    with torch.no_grad():
        expected = model(example).float()
        out = call(inputs)
        got = (out if torch.is_tensor(out) else torch.from_numpy(np.asarray(out))).float()
    scale = max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if not diff <= tolerance * scale:
        raise Unavailable(f"outputs differ from eager by {diff:.3g} (> {tolerance:g} x logit scale {scale:.3g})")


def timed(call: Callable, inputs: Any, threads: int, warmup: int, repeats: int) -> dict[str, float]:
    """p50 / p90 in ms of `call(inputs)`, timed as pqsweep.measure.latency times eager."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # see pqsweep.measure.latency
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="call(x)", globals={"call": call, "x": inputs}, num_threads=threads)
    with torch.no_grad():
        timer.timeit(warmup)
        times = np.array([timer.timeit(1).times[0] for _ in range(repeats)]) * 1e3
    return {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90))}


def short(error: BaseException) -> str:
    """One line, at most REASON_CHARS: the innermost cause, as export reports it."""
    text = str(error) if isinstance(error, Unavailable) else export.reason(error)
    text = " ".join(text.split())
    # torch.onnx's legacy exporter: "SymbolicValueError: Unsupported: ONNX export of operator X, ..." -> its gist
    text = re.sub(r"^\w+: Unsupported: ONNX export of operator (\w+).*", r"no ONNX export of \1: \g<0>", text)
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


def measure(model: nn.Module, example: torch.Tensor, runtimes, threads: int, warmup: int, repeats: int,
            tolerance: float = 1e-4) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of every runtime in `runtimes` but eager (pqsweep.measure.latency's); see the module doc."""
    metrics: dict[str, float] = {}
    tags = {tag(EAGER): f"torch {torch.__version__} eager, {threads} thread(s)"} if EAGER in runtimes else {}
    model.eval()
    example = example.detach().cpu()
    for runtime in (r for r in runtimes if r != EAGER):
        try:
            absent = missing(runtime)
            if absent:  # the pre-run check refuses this; a run called another way says it here
                raise Unavailable(absent)
            with tempfile.TemporaryDirectory(prefix=f"pqsweep-{runtime}-") as directory:
                call, inputs, provider = PREPARE[runtime](model, example, threads, Path(directory))
                _check(model, call, inputs, example, tolerance)
                found = timed(call, inputs, threads, warmup, repeats)
        except Exception as error:  # noqa: BLE001 - a runtime that cannot run the model fails no trial
            tags[tag(runtime)] = NOT_AVAILABLE + short(error)
            log.info("%s: not measured (%s)", runtime, tags[tag(runtime)])
            continue
        metrics[p50(runtime)], metrics[p90(runtime)] = found["p50"], found["p90"]
        tags[tag(runtime)] = provider
    return metrics, tags
