"""A sensitivity scan's results: the curves, the per-layer amounts they choose, and their plot (003, Figs 1-4)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from matplotlib.figure import Figure
from omegaconf import DictConfig

ALL_LAYERS = "all layers"  # the curve of the option at the same amount in every layer


@dataclass
class Curves:
    """The scan's points (one dict per layer x amount, ALL_LAYERS for every layer at once) and their reference."""

    baseline_top1: float  # the unpruned baseline on the scan's split
    baseline_key: str
    baseline_cached: bool
    rows: list[dict] = field(default_factory=list)  # {layer, amount, top1, top1_drop}; drop > 0 is worse
    info: dict[str, tuple[str, int]] = field(default_factory=dict)  # layer -> (module class, weight count)
    cached: bool = False  # the curves came from the stage cache (the curves stage, pqsweep.cache): nothing was pruned

    def add(self, layer: str, amount: float, top1: float) -> None:
        self.rows.append({"layer": layer, "amount": amount, "top1": top1, "top1_drop": self.baseline_top1 - top1})

    def layers(self) -> list[str]:
        return list(dict.fromkeys(r["layer"] for r in self.rows if r["layer"] != ALL_LAYERS))

    def of(self, layer: str) -> list[dict]:
        return [r for r in self.rows if r["layer"] == layer]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["layer", "amount", "top1", "top1_drop"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()


def choose(curves: Curves, tolerance: float) -> dict[str, float]:
    """Per layer, the largest amount such that it and every smaller scanned amount stay within `tolerance` pp.

    Stopping at the first amount past the tolerance, rather than taking any larger one that happens to pass,
    keeps a noisy recovery on a small split (one image is ~0.7 pp of digits' val) from choosing an amount
    beyond where the layer already broke. 0 when even the smallest scanned amount fails.
    """
    chosen = {}
    for layer in curves.layers():
        best = 0.0
        for row in sorted(curves.of(layer), key=lambda r: r["amount"]):
            if row["top1_drop"] > tolerance + 1e-9:
                break
            best = row["amount"]
        chosen[layer] = best
    return chosen


def plot(curves: Curves, cfg: DictConfig) -> Figure:
    """One line per layer plus the all-layers curve (black), top-1 against amount; the dotted line is the tolerance."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")  # a bare Figure renders with Agg; no pyplot state
    ax = fig.add_subplot()
    for layer in curves.layers():
        rows = curves.of(layer)
        kind, weights = curves.info.get(layer, ("", 0))
        label = f"{layer} {kind} ({weights})"
        ax.plot([r["amount"] for r in rows], [r["top1"] for r in rows], marker=".", linewidth=1, label=label)
    rows = curves.of(ALL_LAYERS)
    ax.plot([r["amount"] for r in rows], [r["top1"] for r in rows], "k--", marker="o", linewidth=2,
            label=f"{ALL_LAYERS} ({cfg.pruning.name} at the same amount)")
    ax.axhline(curves.baseline_top1 - cfg.sensitivity.tolerance, color="grey", linestyle=":", label="tolerance")
    ax.set(xlabel=f"pruning.amount of one layer ({cfg.pruning.name}; {ALL_LAYERS}: of every layer)",
           ylabel=f"top-1 on {cfg.sensitivity.split} (%)",
           title=f"{cfg.model.name} on {cfg.dataset.name}: {cfg.pruning.name} sensitivity, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(curves.layers()) // 30)
    return fig


def table(curves: Curves, amounts: dict[str, float]) -> str:
    """Per layer: its weights, the chosen amount, and top-1 and its drop there."""
    lines = [f"baseline top-1 on the scan's split: {curves.baseline_top1:.2f}%",
             f"{'layer':<28} {'module':<10} {'weights':>9} {'amount':>6} {'top1':>7} {'drop':>6}"]
    for layer, amount in amounts.items():
        row = next((r for r in curves.of(layer) if r["amount"] == amount), None)  # None: no scanned amount passed
        top1, drop = (row["top1"], row["top1_drop"]) if row else (float("nan"), float("nan"))
        kind, weights = curves.info[layer]
        lines.append(f"{layer:<28} {kind:<10} {weights:>9} {amount:>6.2f} {top1:>7.2f} {drop:>+6.2f}")
    return "\n".join(lines)
