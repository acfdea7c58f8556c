"""What a run measures, one table: each MLflow metric's direction, unit, report column, format, place in the MLflow
view and description. The sweeper takes objectives' directions from it, pqsweep-report its columns, the study's
MLflow view its first columns, and docs/metrics.md is `python -m pqsweep.metrics` (a test compares).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from pqsweep.runtimes import EXTRA, p50, p90, tag


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str | None  # maximize / minimize; None: a fact or a setting, never an objective
    unit: str  # in the CSV header
    header: str  # the report's column
    fmt: str  # the report's cells
    view: bool  # a first column of a study's MLflow runs table (in this table's order)
    description: str


TABLE = (
    Metric("top1", "maximize", "%", "top1 %", "{:.2f}", True,
           "percent correct on the test split."),
    Metric("top5", "maximize", "%", "top5 %", "{:.2f}", False,
           "percent whose label is among the 5 highest logits."),
    Metric("top1_delta", "maximize", "pp", "Δ top1", "{:+.2f}", True,
           "this run's `top1` minus the baseline's `top1`, both measured in the same process."),
    Metric("baseline_top1", "maximize", "%", "base top1 %", "{:.2f}", False, "that baseline `top1`."),
    Metric("params_total", "minimize", "", "params", "{:.0f}", False,
           "every stored parameter of the deployed model (weights of quantized layers included)."),
    Metric("params_nonzero", "minimize", "", "nonzero", "{:.0f}", False, "those that are not zero."),
    Metric("params_trainable", None, "", "params_trainable", "{:.4g}", False,
           "parameters of the float model that `train.trainable` lets train: a fact, not a goal."),
    Metric("sparsity", "maximize", "", "sparsity", "{:.3f}", False,
           "zero weights / all weights over the Conv2d and Linear weights as stored (int8 zeros included)."),
    Metric("macs", "minimize", "", "MACs", "{:.4g}", False,
           "multiply-accumulates of one batch-1 forward pass of the float network, from `torch.utils.flop_counter` "
           "(dense: unstructured zeros still count)."),
    Metric("size_mb", "minimize", "MB", "size MB", "{:.4f}", True,
           "bytes of `torch.save(state_dict)` of the deployed model (int8 as int8, fp16 as fp16, `sparse`'s CSR "
           "weights as their values, int32 column indices and row pointers, masks folded in) / 1e6."),
    Metric("size_gzip_mb", "minimize", "MB", "gzip MB", "{:.4f}", False,
           "the same bytes gzipped (level 9) / 1e6."),
    Metric("size_sparse_mb", "minimize", "MB", "sparse MB", "{:.4f}", True,
           "what a sparse format would store, without file framing: each Conv/Linear weight's non-zeros at their "
           "stored element size plus the cheaper of a bitmask (1 bit per weight) and one int32 flat index per "
           "non-zero; every other stored tensor (biases, BatchNorm, quantization scales and zero-points) dense. A "
           "dense weight costs its bytes plus a bitmask: sparse storage only pays with zeros."),
    Metric("size_theoretical_mb", "minimize", "MB", "theor. MB", "{:.4f}", False,
           "non-zero parameters x bits / 8 / 1e6, bits = the stored precision (or `bits_w` for `fake_quant`, stored "
           "as fp32); no indices, scales or buffers. A lower bound no real format reaches."),
    Metric("reduction_factor", "maximize", "x", "reduction", "{:.2f}x", False,
           "baseline `size_mb` / this `size_mb`."),
    Metric("reduction_factor_gzip", "maximize", "x", "gzip red.", "{:.2f}x", False,
           "the same for the gzip sizes."),
    Metric("latency_ms_p50", "minimize", "ms", "p50 ms", "{:.3f}", True,
           "median of the batch-1 CPU forward passes: `measure.warmup` untimed calls, then `measure.repeats` calls "
           "timed one at a time with `torch.utils.benchmark`, at `measure.threads` threads."),
    Metric("latency_ms_p90", "minimize", "ms", "p90 ms", "{:.3f}", False, "their 90th percentile."),
    Metric("latency_threads", None, "", "latency_threads", "{:.4g}", False,
           "the threads the latency was measured at: a setting recorded beside it."),
    *(metric for runtime in EXTRA for metric in (
        Metric(p50(runtime), "minimize", "ms", f"p50 ms {runtime}", "{:.3f}", False,
               f"`latency_ms_p50` measured in {runtime} (`measure.runtimes`; pqsweep.runtimes says how), absent where "
               f"{runtime} cannot run the model: the run's tag `{tag(runtime)}` says why, or what ran it."),
        Metric(p90(runtime), "minimize", "ms", f"p90 ms {runtime}", "{:.3f}", False, "their 90th percentile."))),
    Metric("export_max_abs_diff", "minimize", "", "export_max_abs_diff", "{:.4g}", False,
           "with `export`: max |exported - eager| logit on the example and a batch of four."),
)
METRICS: dict[str, Metric] = {m.name: m for m in TABLE}
OBJECTIVES = [m.name for m in TABLE if m.direction]  # what study.objectives and constraints may name
VIEW = [m.name for m in TABLE if m.view]
# study.early_stop: the objectives a trial's validation curve predicts, and the accuracies it cannot; every other
# objective is a cost, known once the trial is pruned
CURVED = ("top1", "top1_delta")
UNCURVED = ("top5", "baseline_top1")


def directions(objectives) -> list[str]:
    """Optuna's direction for each objective: derived, never repeated in a sweep file."""
    return [METRICS[name].direction for name in objectives]


def markdown() -> str:
    """docs/metrics.md: one item per metric, from this table, wrapped at the docs' 120 columns."""
    return "".join(textwrap.fill(f"- `{m.name}` ({m.direction or 'no direction'}{', ' + m.unit if m.unit else ''}): "
                                 f"{m.description}", 120, subsequent_indent="  ", break_long_words=False,
                                 break_on_hyphens=False) + "\n" for m in TABLE)


if __name__ == "__main__":
    print(markdown(), end="")
