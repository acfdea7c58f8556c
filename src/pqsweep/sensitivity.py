"""Pruning sensitivity scan (003, Figs 1-4): prune each layer alone, and the whole net globally, and record top-1.

    pqsweep-sensitivity model=cnn dataset=mnist5k sensitivity.tolerance=0.5 sensitivity.output=cnn_amounts.yaml
    pqsweep model=cnn dataset=mnist5k pruning=layer_magnitude pruning.layer_amounts=cnn_amounts.yaml
    pqsweep-sensitivity model=resnet18_cifar dataset=fake sensitivity.method=l1_filter sensitivity.output=r18.yaml
    pqsweep model=resnet18_cifar dataset=fake pruning=l1_filter pruning.layer_amounts=r18.yaml

The baseline comes from the same cache as `pqsweep`'s (a scan after a sweep trains nothing); every point is the
baseline with one layer pruned and no fine-tuning, measured on `sensitivity.split` (val: choosing amounts on the
test split would leak it). Per layer, the largest amount up to which top-1 stays within `sensitivity.tolerance` pp
of the baseline is written to `sensitivity.output`, the YAML `pruning.layer_amounts` takes. One MLflow run (tag
stage=sensitivity) holds the curves (sensitivity.csv, sensitivity.png), the chosen amounts (layer_amounts.yaml) and
the config.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import mlflow
import torch.nn.utils.prune as torch_prune
import yaml
from hydra.utils import execution_whitelist, to_absolute_path
from matplotlib.figure import Figure
from mlflow.entities import Metric
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from pqsweep import measure, tracking
from pqsweep.cli import CONF_DIR
from pqsweep.config import TRUSTED_TARGETS, SensitivityMethod, validate
from pqsweep.pipeline import baseline, build_model, load_data
from pqsweep.preflight import preflight
from pqsweep.prune import global_magnitude, prunable_layers
from pqsweep.train import seed_everything

log = logging.getLogger("pqsweep.sensitivity")


@dataclass
class Curves:
    """The scan's points (one dict per layer x amount, layer 'global' for the global curve) and their reference."""

    baseline_top1: float  # the unpruned baseline on the scan's split
    baseline_key: str
    baseline_cached: bool
    rows: list[dict] = field(default_factory=list)  # {layer, amount, top1, top1_drop}; drop > 0 is worse
    info: dict[str, tuple[str, int]] = field(default_factory=dict)  # layer -> (module class, weight count)

    def add(self, layer: str, amount: float, top1: float) -> None:
        self.rows.append({"layer": layer, "amount": amount, "top1": top1, "top1_drop": self.baseline_top1 - top1})

    def layers(self) -> list[str]:
        return list(dict.fromkeys(r["layer"] for r in self.rows if r["layer"] != "global"))

    def of(self, layer: str) -> list[dict]:
        return [r for r in self.rows if r["layer"] == layer]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["layer", "amount", "top1", "top1_drop"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()


def scan_layers(model: nn.Module, method: SensitivityMethod) -> list[str]:
    """Layers the scan prunes one at a time: every prunable layer (magnitude); for l1_filter every one that makes
    its own output channels: not the classifier (its outputs are the classes) and not a depthwise conv (its
    channels are its producer's: naming it would repeat the producer's curve)."""
    layers = list(prunable_layers(model))
    if method == SensitivityMethod.magnitude:
        return [name for name, _ in layers]
    from pqsweep.structured import classifier_name

    head = classifier_name(model)
    return [name for name, m in layers if name != head and getattr(m, "groups", 1) == 1]


def prune_layer(model: nn.Module, layer: str, amount: float, method: SensitivityMethod, example) -> nn.Module:
    """`model` with `layer` alone pruned at `amount`, masks folded (magnitude) or filters removed (l1_filter)."""
    if method == SensitivityMethod.magnitude:
        module = model.get_submodule(layer)
        torch_prune.l1_unstructured(module, "weight", amount=float(amount))
        torch_prune.remove(module, "weight")
        return model
    from pqsweep.structured import prune_filters  # written alongside; only the l1_filter method needs it

    return prune_filters(model, example, amount=0.0, scope="layer", layer_amounts={layer: float(amount)})


def _size(model: nn.Module) -> tuple[int, int]:
    """(parameters, zero weights): changes when filters are removed or weights are zeroed."""
    return sum(p.numel() for p in model.parameters()), sum(int((p == 0).sum()) for p in model.parameters())


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


def scan(cfg: DictConfig) -> tuple[Curves, dict[str, float]]:
    """The baseline as the pipeline gets it, then top-1 with each layer pruned alone and with the whole net
    pruned globally at every amount; returns the curves and the chosen {layer: amount}."""
    validate(cfg)
    s = cfg.sensitivity
    seed_everything(cfg.train.seed)  # the same initialisation as a pipeline run: the same cached baseline
    splits, loaders = load_data(cfg)
    model = build_model(cfg, splits)
    base = baseline(cfg, model, loaders)
    model.load_state_dict(base.state)
    model.cpu().eval()
    loader = loaders[s.split]
    example = next(iter(loader))[0][:1]

    curves = Curves(measure.accuracy(model, loader)["top1"], base.key, base.cached)
    layers = scan_layers(model, s.method)
    curves.info = {n: (type(m).__name__, m.weight.numel()) for n, m in model.named_modules() if n in layers}
    amounts = sorted(float(a) for a in s.amounts)
    size, changed = _size(model), set()
    with tqdm(total=(len(layers) + 1) * len(amounts), desc="sensitivity", unit="point", leave=False) as bar:
        for layer in layers:
            for amount in amounts:
                pruned = prune_layer(copy.deepcopy(model), layer, amount, s.method, example)
                curves.add(layer, amount, measure.accuracy(pruned, loader)["top1"])
                changed.update([layer] if _size(pruned) != size else [])
                bar.update(1)
        for amount in amounts:
            pruned = global_magnitude(copy.deepcopy(model), OmegaConf.create({"amount": amount}))
            curves.add("global", amount, measure.accuracy(pruned, loader)["top1"])
            bar.update(1)
    if s.method == SensitivityMethod.l1_filter and max(amounts) > 0:
        # Channels tied to a split, concat or shuffle (ShuffleNetV2's block edges) cannot go one layer alone:
        # prune_filters leaves such a layer whole, and an amount written for it would be one no run applies.
        fixed = [layer for layer in layers if layer not in changed]
        if fixed:
            log.info("l1_filter: no filters removable from %s alone; left out of the curves", ", ".join(fixed))
        curves.rows = [r for r in curves.rows if r["layer"] not in fixed]
    return curves, choose(curves, s.tolerance)


def plot(curves: Curves, cfg: DictConfig) -> Figure:
    """One line per layer plus the global curve (black), top-1 against amount; the dotted line is the tolerance."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")  # a bare Figure renders with Agg; no pyplot state
    ax = fig.add_subplot()
    for layer in curves.layers():
        rows = curves.of(layer)
        kind, weights = curves.info.get(layer, ("", 0))
        label = f"{layer} {kind} ({weights})"
        ax.plot([r["amount"] for r in rows], [r["top1"] for r in rows], marker=".", linewidth=1, label=label)
    rows = curves.of("global")
    ax.plot([r["amount"] for r in rows], [r["top1"] for r in rows], "k--", marker="o", linewidth=2, label="global")
    ax.axhline(curves.baseline_top1 - cfg.sensitivity.tolerance, color="grey", linestyle=":", label="tolerance")
    unit = "weights" if cfg.sensitivity.method == SensitivityMethod.magnitude else "filters"
    ax.set(xlabel=f"fraction of the layer's {unit} pruned (global: of all prunable weights)",
           ylabel=f"top-1 on {cfg.sensitivity.split} (%)",
           title=f"{cfg.model.name} on {cfg.dataset.name}: {cfg.sensitivity.method.value} sensitivity, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(curves.layers()) // 30)
    return fig


def write_amounts(amounts: dict[str, float], path: str) -> str:
    """The YAML mapping `pruning.layer_amounts` reads, layers in model order; returns the path."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(amounts, sort_keys=False))
    return path


def _key(name: str) -> str:
    """A layer name as part of an MLflow metric key (letters, digits, _ - . / and space only)."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def run_and_log(cfg: DictConfig) -> tuple[Curves, dict[str, float], str]:
    """Scan, write the amounts file, and log everything as one MLflow run; returns (curves, amounts, file path)."""
    tracking.setup(cfg)
    tags = {"stage": "sensitivity", "sweep": cfg.study.name, "method": cfg.sensitivity.method.value}
    name = f"sensitivity-{cfg.model.name}-{cfg.dataset.name}-{cfg.sensitivity.method.value}"
    with tracking.task_run(name, tags) as active:
        client, run_id = mlflow.MlflowClient(), active.info.run_id
        groups = ("model", "dataset", "train", "sensitivity", "device")
        tracking.log_batch(client, run_id, params=tracking.flat_params(cfg, groups=groups))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        curves, amounts = scan(cfg)
        output = write_amounts(amounts, to_absolute_path(cfg.sensitivity.output))  # relative: to the launch dir
        mlflow.log_text(Path(output).read_text(), "layer_amounts.yaml")
        mlflow.log_text(curves.to_csv(), "sensitivity.csv")
        mlflow.log_figure(plot(curves, cfg), "sensitivity.png")
        metrics = {"baseline_top1": curves.baseline_top1}
        metrics.update({f"chosen_amount/{_key(layer)}": amount for layer, amount in amounts.items()})
        if cfg.sensitivity.method == SensitivityMethod.magnitude:  # filters are not weights: no such sum there
            metrics["chosen_sparsity"] = chosen_sparsity(curves, amounts)
        tags = {"baseline_hash": curves.baseline_key, "baseline_cached": str(curves.baseline_cached).lower()}
        tracking.log_batch(client, run_id, metrics=metrics, tags=tags)
        # Each curve also as a metric series (step = amount in percent), so the MLflow UI can chart it.
        series = [Metric(f"top1/{_key(r['layer'])}", r["top1"], 0, round(100 * r["amount"])) for r in curves.rows]
        for start in range(0, len(series), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=series[start : start + 1000])
    log.info("sensitivity run %s: %d points, amounts written to %s", run_id, len(curves.rows), output)
    return curves, amounts, output


def chosen_sparsity(curves: Curves, amounts: dict[str, float]) -> float:
    """Share of the scanned layers' weights that `layer_magnitude` removes with these amounts."""
    weights = {layer: curves.info[layer][1] for layer in amounts}
    return sum(round(amounts[layer] * n) for layer, n in weights.items()) / max(sum(weights.values()), 1)


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


@hydra.main(config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    curves, amounts, output = run_and_log(cfg)
    print(table(curves, amounts))
    pruning = "layer_magnitude" if cfg.sensitivity.method == SensitivityMethod.magnitude else "l1_filter"
    print(f"wrote {output}; use it with: pqsweep pruning={pruning} pruning.layer_amounts={output}")


def main() -> None:
    preflight(sys.argv[1:], CONF_DIR, prog="pqsweep-sensitivity")  # sensitivity ranges are in config.validate
    with execution_whitelist(TRUSTED_TARGETS):  # Hydra's own instantiations: callbacks, sweeper, sampler
        app()


if __name__ == "__main__":
    main()
