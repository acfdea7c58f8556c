"""`pqsweep-sensitivity`: prune each layer alone, and every layer at once, with a per-layer pruning option (003, Figs 1-4).

    pqsweep-sensitivity model=cnn dataset=mnist5k sensitivity.tolerance=0.5 sensitivity.output=cnn_amounts.yaml
    pqsweep model=cnn dataset=mnist5k pruning=layer_magnitude pruning.layer_amounts=cnn_amounts.yaml
    pqsweep-sensitivity model=resnet18_cifar dataset=fake pruning=l1_filter sensitivity.output=r18.yaml
    pqsweep model=resnet18_cifar dataset=fake pruning=l1_filter pruning.layer_amounts=r18.yaml

The scan runs the ordinary `pruning` option (default `layer_magnitude`; any option whose file says
`per_layer: true`) with `layer_amounts={layer: amount}` for one layer at a time, and at `amount` for every layer at
once, on the baseline from the same cache as `pqsweep`'s (a scan after a sweep trains nothing), with no
fine-tuning, and measures top-1 on `sensitivity.split` (val: choosing amounts on the test split would leak it). Per
layer, the largest amount up to which top-1 stays within `sensitivity.tolerance` pp of the baseline is written to
`sensitivity.output`, the YAML `pruning.layer_amounts` takes. One MLflow run (tag stage=sensitivity) holds the
curves (sensitivity.csv, sensitivity.png), the chosen amounts (layer_amounts.yaml) and the config.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.utils import execution_whitelist, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from pqsweep import console, helptext, interrupts
from pqsweep.preflight import CONFIG_MODULE, preflight
from pqsweep.schema import register
from pqsweep.checks import TRUSTED_TARGETS, ConfigError

log = logging.getLogger("pqsweep.sensitivity")
register()


def scannable(cfg: DictConfig) -> None:
    """The scan prunes one layer at a time, so it needs an option that takes per-layer amounts."""
    if not cfg.pruning.per_layer:
        raise ConfigError(f"pruning={cfg.pruning.name} is not allowed: pqsweep-sensitivity needs an option that "
                          "takes per-layer amounts (its file says per_layer: true), e.g. layer_magnitude or l1_filter",
                          key="pruning")


def _pruned(model, cfg: DictConfig, ctx, amount: float, layer_amounts: dict | None):
    """A copy of `model` pruned by the configured option at `amount`, with `layer_amounts` for the layers it names."""
    from pqsweep.pruning import prune

    node = OmegaConf.create(OmegaConf.to_container(cfg.pruning, resolve=True))  # untyped: takes a mapping
    node.amount, node.layer_amounts = float(amount), layer_amounts
    return prune(copy.deepcopy(model), node, ctx)


def _signature(model) -> tuple:
    """What a pruned model is: two layers whose pruning gives the same model have the same curve (a depthwise conv
    and the conv whose channels it shares), so the second is left out."""
    return tuple((k, tuple(v.shape), float(v.float().abs().sum())) for k, v in model.state_dict().items())


def scan(cfg: DictConfig):
    """The baseline as the pipeline gets it, then top-1 with each layer pruned alone and with every layer pruned,
    at every amount; returns the curves and the chosen {layer: amount}."""
    from pqsweep import measure
    from pqsweep.pipeline import baseline, build_model, load_data, stages_of
    from pqsweep.reports.sensitivity import Curves, choose
    from pqsweep.train import Context, seed_everything
    from pqsweep.validate import validate

    validate(cfg)
    scannable(cfg)
    s = cfg.sensitivity
    seed_everything(cfg.train.seed)  # the same initialisation as a pipeline run: the same cached baseline
    stages = stages_of(cfg)
    splits, loaders = load_data(cfg, stages)
    model = build_model(cfg, splits)
    initial_state = copy.deepcopy(model.state_dict())
    base = baseline(cfg, stages, model, loaders)
    model.load_state_dict(base.state)
    model.cpu().eval()
    loader = loaders[s.split]
    example = next(iter(loader))[0][:1]
    ctx = Context(loaders, example, cfg.train, cfg.device, initial_state)

    def saved(curves: Curves) -> dict:
        return {"baseline_top1": curves.baseline_top1, "rows": curves.rows, "info": curves.info}

    def loaded(entry: dict) -> Curves:
        return Curves(entry["baseline_top1"], base.key, base.cached, list(entry["rows"]), dict(entry["info"]),
                      cached=True)

    curves = stages.get("curves", lambda: measure_curves(cfg, model, loader, ctx, base), save=saved, load=loaded)
    chosen = choose(curves, s.tolerance)
    with_chosen = _pruned(model, cfg, ctx, 0.0, chosen)
    curves.chosen = {"chosen_top1": measure.accuracy(with_chosen, loader)["top1"],
                     **{f"chosen_{k}": v for k, v in measure.parameter_counts(with_chosen).items()}}
    return curves, chosen


def measure_curves(cfg: DictConfig, model, loader, ctx, base):
    """Top-1 with each layer pruned alone and with every layer pruned, at every amount."""
    from pqsweep import measure
    from pqsweep.reports.sensitivity import ALL_LAYERS, Curves
    from pqsweep.weights import prunable_layers

    curves = Curves(measure.accuracy(model, loader)["top1"], base.key, base.cached)
    amounts = sorted(float(a) for a in cfg.sensitivity.amounts)
    layers = [(name, module) for name, module in prunable_layers(model)]
    unchanged, seen = _signature(model), {}
    with console.bar(total=(len(layers) + 1) * len(amounts), desc="sensitivity", unit="point") as bar:
        for layer, module in layers:
            rows = []
            for amount in amounts:
                pruned = _pruned(model, cfg, ctx, 0.0, {layer: amount})
                rows.append((amount, measure.accuracy(pruned, loader)["top1"]))
                bar.update(1)
            signature = _signature(pruned)  # at the largest amount
            if max(amounts) > 0 and signature == unchanged:
                log.info("%s: %s leaves %s whole at every amount; left out of the curves", cfg.pruning.name, layer, layer)
            elif max(amounts) > 0 and signature in seen:
                log.info("%s: pruning %s alone is pruning %s; left out of the curves", cfg.pruning.name, layer,
                         seen[signature])
            else:
                seen[signature] = layer
                curves.info[layer] = (type(module).__name__, module.weight.numel())
                for amount, top1 in rows:
                    curves.add(layer, amount, top1)
        for amount in amounts:
            curves.add(ALL_LAYERS, amount, measure.accuracy(_pruned(model, cfg, ctx, amount, None), loader)["top1"])
            bar.update(1)
    return curves


def write_amounts(amounts: dict[str, float], path: str) -> str:
    """The YAML mapping `pruning.layer_amounts` reads, layers in model order; returns the path."""
    import yaml

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(amounts, sort_keys=False))
    return path


def _key(name: str) -> str:
    """A layer name as part of an MLflow metric key (letters, digits, _ - . / and space only)."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def run_and_log(cfg: DictConfig):
    """Scan, write the amounts file, and log everything as one MLflow run; returns (curves, amounts, file path)."""
    import mlflow
    from mlflow.entities import Metric

    from pqsweep import records, tracking
    from pqsweep.reports.sensitivity import plot

    tracking.setup(cfg)
    tags = {"stage": "sensitivity", "sweep": cfg.study.name, "method": cfg.pruning.name}
    name = f"sensitivity-{cfg.model.name}-{cfg.dataset.name}-{cfg.pruning.name}"
    with tracking.task_run(name, tags) as active:
        client, run_id = mlflow.MlflowClient(), active.info.run_id
        tracking.log_batch(client, run_id, params=records.params(cfg, "amounts"))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        curves, amounts = scan(cfg)
        output = write_amounts(amounts, to_absolute_path(cfg.sensitivity.output))  # relative: to the launch dir
        mlflow.log_text(Path(output).read_text(), "layer_amounts.yaml")
        mlflow.log_text(curves.to_csv(), "sensitivity.csv")
        mlflow.log_figure(plot(curves, cfg), "sensitivity.png")
        metrics = {"baseline_top1": curves.baseline_top1, **curves.chosen}
        metrics.update({f"chosen_amount/{_key(layer)}": amount for layer, amount in amounts.items()})
        tags = {"baseline_hash": curves.baseline_key, "baseline_cached": str(curves.baseline_cached).lower(),
                "curves_cached": str(curves.cached).lower()}
        tracking.log_batch(client, run_id, metrics=metrics, tags=tags)
        # Each curve also as a metric series (step = amount in percent), so the MLflow UI can chart it.
        series = [Metric(f"top1/{_key(r['layer'])}", r["top1"], 0, round(100 * r["amount"])) for r in curves.rows]
        for start in range(0, len(series), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=series[start : start + 1000])
    log.info("sensitivity run %s: %s, amounts written to %s", run_id, console.plural(len(curves.rows), "point"), output)
    return curves, amounts, output


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="sensitivity")
def app(cfg: DictConfig) -> None:
    from pqsweep.reports.sensitivity import table

    curves, amounts, output = run_and_log(cfg)
    print(table(curves, amounts))
    print(f"wrote {output}; use it with: pqsweep pruning={cfg.pruning.name} pruning.layer_amounts={output}")


def main() -> None:
    if helptext.asked(sys.argv[1:]):
        print(helptext.text("pqsweep-sensitivity"), end="")
        return
    preflight(sys.argv[1:], prog="pqsweep-sensitivity", config_name="sensitivity", require=scannable)
    with interrupts.handled("pqsweep-sensitivity"), execution_whitelist(TRUSTED_TARGETS):  # Hydra's own too
        app()


if __name__ == "__main__":
    main()
