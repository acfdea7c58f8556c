"""Where a deployed model's latency can be measured (`measure.runtimes`): the runtimes' names, what each needs
installed, and the names of their metrics and tags. Nothing here imports torch: pqsweep.metrics and the pre-run
check read it; pqsweep.latency measures.

- eager: the deployed nn.Module called in PyTorch, as `latency_ms_p50` has always been measured.
- torchscript: the model traced by torch.jit.trace (pqsweep.export.traced, the file `export=torchscript` writes).
- onnxruntime: the model exported to ONNX (pqsweep.export's exporters) and run by an onnxruntime InferenceSession on
  its CPUExecutionProvider, intra-op threads = `measure.threads`.
- compile: torch.compile (TorchInductor's C++ backend on CPU, which needs a C++ compiler on the PATH).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

EAGER = "eager"
RUNTIMES = (EAGER, "torchscript", "onnxruntime", "compile")
EXTRA = RUNTIMES[1:]  # the runtimes measured besides eager, each under metric names of its own

# The Python packages a runtime imports: onnxruntime also needs the exporter's (torch.onnx's dynamo exporter writes
# through onnxscript and checks with onnx).
PACKAGES = {"onnxruntime": ("onnx", "onnxscript", "onnxruntime")}
COMPILERS = ("CXX", "c++", "g++", "clang++")  # what TorchInductor's cpp_builder looks for, in this order
NOT_AVAILABLE = "n/a: "  # how a runtime tag begins where the runtime could not run the model


def p50(runtime: str) -> str:
    """The metric name of a runtime's median latency; eager keeps the name it always had."""
    return "latency_ms_p50" if runtime == EAGER else f"latency_ms_p50_{runtime}"


def p90(runtime: str) -> str:
    return "latency_ms_p90" if runtime == EAGER else f"latency_ms_p90_{runtime}"


def tag(runtime: str) -> str:
    """The run tag that says what ran a runtime's measurement (its provider and version), or why none was made."""
    return f"runtime.{runtime}"


def _importable(package: str) -> bool:
    """Whether `import package` would find it, without importing it (onnxruntime takes ~0.3 s to import)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds it as None, the way to make an import fail
        return False


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((found for name in COMPILERS[1:] if (found := shutil.which(name))), None)


def missing(runtime: str) -> str | None:
    """What this machine lacks to run `runtime` (one phrase), or None where it has it all."""
    absent = [p for p in PACKAGES.get(runtime, ()) if not _importable(p)]
    if absent:
        return f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed (pip install {' '.join(absent)})"
    if runtime == "compile" and _compiler() is None:
        return "no C++ compiler on the PATH for TorchInductor (install g++, or set CXX)"
    return None
