"""One run as a list of stages: data -> model -> baseline -> its metrics -> (structured ->) prune -> quantize and
measure (the trial).

Each cached stage is `stages.get(<stage>, <compute>)` (pqsweep.cache.Stages, declared in pqsweep.stages.STAGES), so
a grid computes each distinct stage once and every other point loads it. `run(cfg)` returns the trial's metrics and
what its data were (numbers only; the deployed model too where `tracking.log_model` asks for it); pqsweep.trial logs
them to MLflow.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from pqsweep import console, early_stop, latency, measure
from pqsweep.cache import Randomness, Stages, Unfit
from pqsweep.data import DataSplits, limited
from pqsweep.options import RETRAINED, Export, Order
from pqsweep.train import Context, fit, seed_everything, trainable_parameters
from pqsweep.validate import validate
from pqsweep.weights import footprint, restore_structure, structure

log = logging.getLogger(__name__)


@dataclass
class Baseline:
    key: str
    state: dict
    cached: bool  # True when this process trained nothing
    history: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    metrics: dict[str, float]
    baseline: Baseline
    baseline_metrics: dict[str, float]
    stages_cached: dict[str, bool] = field(default_factory=dict)  # {"prune": True, ...}: loaded, computed nothing
    stages_seconds: dict[str, float] = field(default_factory=dict)  # {"baseline": 95.2, ...}: those it computed
    data: dict[str, int] = field(default_factory=dict)  # split sizes and image shape (describe_data)
    model: nn.Module | None = None  # the model as deployed, kept only where tracking.log_model asks for it
    example: torch.Tensor | None = None  # one test input, beside `model`
    tags: dict[str, str] = field(default_factory=dict)  # what ran each runtime's latency, or why none was measured
    baseline_tags: dict[str, str] = field(default_factory=dict)  # the same for the baseline
    # fine-tune epochs this process ran (0 where its stages were loaded): a fact of the work, like stages_cached,
    # not a result, so a tag (finetune_epochs_run) and not a metric
    epochs_run: int = 0


def describe_data(splits: DataSplits) -> dict[str, int]:
    """What the run's data were, as the tracking logs each split: its size, the classes and the image shape."""
    return {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
            "num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": splits.image_size}


def stages_of(cfg: DictConfig) -> Stages:
    return Stages(cfg, Randomness(cfg.train.seed))


# -- the stages ---------------------------------------------------------------------------------------------------


def load_splits(cfg: DictConfig, stages: Stages | None = None) -> DataSplits:
    """The data set's splits, cut to dataset.num_samples; those held in memory come from the data stage's cache
    after their first build."""
    stages = stages or stages_of(cfg)
    built = stages.get("data", lambda: get_method(cfg.dataset._target_)(cfg.dataset),
                       save=DataSplits.tensors, load=DataSplits.from_tensors)
    return limited(built, cfg.dataset.num_samples)


def load_data(cfg: DictConfig, stages: Stages | None = None) -> tuple[DataSplits, dict[str, DataLoader]]:
    splits = load_splits(cfg, stages)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loaders = {
        "train": DataLoader(splits.train, batch_size=cfg.train.batch_size, shuffle=True, generator=generator),
        "val": DataLoader(splits.val, batch_size=cfg.measure.eval_batch_size),
        "test": DataLoader(splits.test, batch_size=cfg.measure.eval_batch_size),
    }
    if stages is not None:
        stages.random.generators["train"] = generator  # handed on by the stages that keep their random state
    return splits, loaders


def build_model(cfg: DictConfig, splits: DataSplits) -> nn.Module:
    factory = get_method(cfg.model._target_)
    return factory(num_classes=splits.num_classes, in_channels=splits.in_channels, pretrained=cfg.model.pretrained)


def baseline(cfg: DictConfig, stages: Stages, model: nn.Module, loaders: dict[str, DataLoader]) -> Baseline:
    """Train the baseline, or load it when the settings that shape it were trained before."""
    key = stages.keys["baseline"]

    def train() -> dict:
        if cfg.train.epochs == 0:
            log.info("baseline %s: train.epochs=0, the untrained model is the baseline", key)
        else:
            log.info("baseline %s: not in cache, training %s", key, console.plural(cfg.train.epochs, "epoch"))
        history = fit(model, loaders["train"], cfg.train, cfg.train.epochs, device=cfg.device, desc="baseline")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {"state_dict": state, "history": history, "config": OmegaConf.to_yaml(cfg)}

    entry = stages.get("baseline", train)
    return Baseline(key, entry["state_dict"], cached=stages.cached["baseline"], history=entry["history"])


def rewound(cfg: DictConfig, stages: Stages, model: nn.Module, initial_state: dict, random_state: torch.Tensor,
            splits: DataSplits) -> dict | None:
    """The baseline's weights after pruning.rewind_epoch epochs, for rewind=weights: its training replayed from the
    same initial weights, global random state and loader order, so they are the weights it had at that epoch."""
    if stages.keys["rewind"] is None:
        return None
    k = int(cfg.pruning.rewind_epoch)

    def replay() -> dict:
        log.info("rewind %s: replaying the baseline's first %s", stages.keys["rewind"], console.plural(k, "epoch"))
        replica = copy.deepcopy(model)
        replica.load_state_dict(initial_state)
        now = torch.get_rng_state()
        torch.set_rng_state(random_state)
        order = torch.Generator().manual_seed(cfg.train.seed)  # as load_data makes the baseline's
        loader = DataLoader(splits.train, batch_size=cfg.train.batch_size, shuffle=True, generator=order)
        try:
            fit(replica, loader, cfg.train, k, device=cfg.device, desc=f"rewind to epoch {k}")
        finally:
            torch.set_rng_state(now)
        return {"state_dict": {name: v.detach().cpu() for name, v in replica.state_dict().items()}}

    return stages.get("rewind", replay)["state_dict"]


def baseline_metrics(cfg: DictConfig, stages: Stages, model: nn.Module, loaders, example,
                     tags: dict[str, str] | None = None) -> dict[str, float]:
    """The baseline as deployed at fp32, measured once per baseline and measurement setting; `tags` gets what ran
    each runtime (kept in the entry beside the metrics: an entry from before measure.runtimes has none)."""
    found: dict[str, str] = {}

    def load(entry: dict) -> dict[str, float]:
        found.update(entry.get("tags", {}))
        return dict(entry["metrics"])

    metrics = stages.get("baseline_metrics", lambda: measure_all(model, model, loaders, example, cfg.measure, found),
                         save=lambda metrics: {"metrics": metrics, "tags": dict(found)}, load=load)
    if tags is not None:
        tags.update(found)
    return metrics


def as_model(template: nn.Module, example: torch.Tensor):
    """How a stage whose result is a model keeps it: its weights and the shapes pruning gave its layers (numbers,
    replayed on a copy of `template` before the weights load), so an entry is tensors only. An entry whose layers
    the template's do not match is unfit: the stage is computed again."""

    def save(model: nn.Module) -> dict:
        return {"state_dict": model.state_dict(), "structure": structure(model)}

    def load(entry: dict) -> nn.Module:
        loaded = copy.deepcopy(template)
        try:
            restore_structure(loaded, entry["structure"], entry["state_dict"])
            loaded.load_state_dict(entry["state_dict"])
            with torch.no_grad():
                loaded.eval()(example.to(next(loaded.parameters()).device))  # the shapes fit each other
        except (KeyError, RuntimeError) as error:
            raise Unfit(f"does not fit the model ({str(error).splitlines()[0][:200]})") from None
        return loaded.cpu().eval()

    return {"save": save, "load": load}


def structured(cfg: DictConfig, stages: Stages, model: nn.Module, ctx: Context) -> nn.Module:
    """A pruning option's structured step (its file names it), run and cached as a stage of its own: the points of a
    grid that differ only in what follows it share it."""

    def compute() -> nn.Module:
        return get_method(cfg.pruning.structured_step)(model, cfg.pruning, ctx).cpu().eval()

    return stages.get("structured", compute, **as_model(model, ctx.example))


def prune_and_finetune(cfg: DictConfig, model: nn.Module, ctx: Context) -> nn.Module:
    """The prune stage's work: prune (a method may fine-tune between its own steps), then, if anything was removed,
    re-estimate BatchNorm (train.bn_batches) and fine-tune (train.finetune_epochs, 0: none), or with
    pruning.rewind=weights / lr retrain from epoch pruning.rewind_epoch of the baseline's schedule."""
    before = footprint(model)
    model = get_method(cfg.pruning._target_)(model, cfg.pruning, ctx)
    if footprint(model) != before:
        if ctx.monitor is not None:  # study.early_stop: its cost, known now, before it fine-tunes
            ctx.monitor.price(model)
        if ctx.rewind in RETRAINED:
            ctx.retrain(model)  # rewound to epoch k and retrained on the baseline's schedule
        elif cfg.train.finetune_epochs > 0:
            ctx.finetune(model)  # re-estimates BatchNorm first
        else:
            ctx.recalibrate(model)
    return model.cpu().eval()


def pruned(cfg: DictConfig, stages: Stages, model: nn.Module, ctx: Context) -> nn.Module:
    """The prune stage, after the structured stage where the option has one. Its entry keeps the random state the
    stage left, so what follows (calibration) sees the same batches whether it was computed or loaded."""
    if stages.keys["structured"] is not None:
        model = structured(cfg, stages, model, ctx)
    return stages.get("prune", lambda: prune_and_finetune(cfg, model, ctx), **as_model(model, ctx.example))


def quantize(cfg: DictConfig, model: nn.Module, ctx: Context) -> nn.Module:
    return get_method(cfg.quantization._target_)(model.cpu().eval(), cfg.quantization, ctx)


def compress(cfg: DictConfig, stages: Stages, model: nn.Module, ctx: Context) -> tuple[nn.Module, nn.Module]:
    """(deployed model, its float counterpart) in `quantization.order`.

    quantize_then_prune prunes the stored (e.g. int8) weights in their own domain, with no fine-tuning: a converted
    int8 model has no float weights to train, and its pruning is cheap, so it is part of the trial, not a stage.
    """
    if cfg.quantization.order == Order.quantize_then_prune:
        deployed = quantize(cfg, model, ctx)
        return get_method(cfg.pruning._target_)(deployed, cfg.pruning, ctx), model
    float_model = pruned(cfg, stages, model, ctx)
    if ctx.monitor is not None:  # its quantization's fine-tuning (QAT) is watched too
        ctx.monitor.price(float_model)
        ctx.monitor.quantizing = True
    return quantize(cfg, float_model, ctx), float_model


def evaluate(model: nn.Module, loader: DataLoader, desc: str) -> dict[str, float]:
    with console.bar(total=len(loader), desc=desc, unit="batch") as bar:
        return measure.accuracy(model, loader, progress=bar)


def costs(cfg: DictConfig, float_model: nn.Module, ctx: Context, reference: dict[str, float]) -> dict[str, float]:
    """What `measure_all` would say of the model deployed from `float_model` on every metric but accuracy, without
    fine-tuning it: quantized as the trial quantizes, with the quantization's own training (QAT's epochs, AdaRound)
    left out, which changes no size, count or MACs. study.early_stop's price of a trial, before it fine-tunes."""
    untrained = OmegaConf.merge(cfg.quantization, {k: v for k, v in (("qat_epochs", 0), ("rounding", "nearest"))
                                                  if k in cfg.quantization})
    deployed = get_method(cfg.quantization._target_)(copy.deepcopy(float_model).cpu().eval(), untrained, ctx)
    metrics = structural(deployed, float_model, ctx.example)
    if any(name.startswith("latency") for name in cfg.study.objectives):  # in every runtime one may be an objective
        metrics.update(latencies(deployed, ctx.example, cfg.measure, cfg.quantization.export_tolerance)[0])
    return metrics | reductions(metrics, reference)


def structural(deployed: nn.Module, float_model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Sizes and parameter counts of the deployed model, MACs of its float counterpart (quantized ops are not
    counted)."""
    return {**measure.sizes(deployed), **measure.parameter_counts(deployed), "macs": measure.macs(float_model, example)}


def latencies(deployed: nn.Module, example: torch.Tensor, mcfg, tolerance: float) -> tuple[dict, dict[str, str]]:
    """(latency in eager and in each of `mcfg.runtimes` (pqsweep.latency), what ran each or why it could not)."""
    elsewhere, found = latency.measure(deployed, example, list(mcfg.runtimes), mcfg.threads, mcfg.warmup,
                                       mcfg.repeats, tolerance)
    return {**measure.latency(deployed, example, mcfg.threads, mcfg.warmup, mcfg.repeats), **elsewhere}, found


def reductions(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """The baseline's sizes over this model's."""
    return {"reduction_factor": reference["size_mb"] / metrics["size_mb"],
            "reduction_factor_gzip": reference["size_gzip_mb"] / metrics["size_gzip_mb"]}


def measure_all(deployed: nn.Module, float_model: nn.Module, loaders, example: torch.Tensor, mcfg,
                tags: dict[str, str] | None = None, tolerance: float = 1e-4) -> dict[str, float]:
    """Every metric of a deployable model; MACs come from its float counterpart (quantized ops are not counted).
    Latency in each of `mcfg.runtimes` (pqsweep.latency); `tags` gets what ran each, or why it could not, and
    `tolerance` is how far (a share of the logit scale) a runtime's outputs may stray from eager's."""
    metrics = evaluate(deployed, loaders["test"], "evaluate")
    if not mcfg.top5:
        metrics.pop("top5")
    metrics.update(structural(deployed, float_model, example))
    timed, found = latencies(deployed, example, mcfg, tolerance)
    metrics.update(timed)
    if tags is not None:
        tags.update(found)
    return metrics


# -- the run ------------------------------------------------------------------------------------------------------


def run(cfg: DictConfig, artifact_dir: str | Path | None = None) -> RunResult:
    """One run; with `export` set, the compressed model is written to `artifact_dir` and checked there."""
    validate(cfg)
    seed_everything(cfg.train.seed)
    stages = stages_of(cfg)
    splits, loaders = load_data(cfg, stages)
    model = build_model(cfg, splits)
    initial_state = copy.deepcopy(model.state_dict())
    at_start = torch.get_rng_state()  # as the baseline's training began: a rewind stage replays from it
    base = baseline(cfg, stages, model, loaders)  # hands on a state re-seeded from train.seed, trained or loaded
    rewind_state = rewound(cfg, stages, model, initial_state, at_start, splits)
    model.load_state_dict(base.state)
    model.cpu().eval()
    example = next(iter(loaders["test"]))[0][:1]
    baseline_tags: dict[str, str] = {}
    reference = baseline_metrics(cfg, stages, model, loaders, example, baseline_tags)

    # the teacher of train.distill: the baseline this run already holds, so distilling loads nothing more
    teacher = copy.deepcopy(model) if cfg.train.distill.enabled else None
    ctx = Context(loaders, example, cfg.train, cfg.device, initial_state, teacher,
                  rewind=str(getattr(cfg.pruning.rewind, "value", cfg.pruning.rewind)),
                  rewind_epoch=int(cfg.pruning.rewind_epoch), rewind_state=rewind_state)
    ctx.monitor = early_stop.monitor(cfg, ctx, reference["top1"], lambda m: costs(cfg, m, ctx, reference))
    deployed, float_model = compress(cfg, stages, copy.deepcopy(model), ctx)
    tags: dict[str, str] = {}
    metrics = measure_all(deployed, float_model, loaders, example, cfg.measure, tags, cfg.quantization.export_tolerance)
    trainable = trainable_parameters(float_model, cfg.train.trainable)  # int8 weights train no more
    metrics["params_trainable"] = float(sum(p.numel() for _, p in trainable))

    if cfg.export != Export.none:
        from pqsweep.export import export  # onnx/onnxruntime load only when asked for

        if artifact_dir is None:
            raise ValueError(f"export={cfg.export.value}: run(cfg, artifact_dir=...) needs a directory to write to")
        metrics.update(export(deployed, example, cfg.export.value, Path(artifact_dir), cfg.quantization))

    metrics["top1_delta"] = metrics["top1"] - reference["top1"]
    metrics.update(reductions(metrics, reference))
    metrics["baseline_top1"] = reference["top1"]
    kept = cfg.tracking.log_model
    return RunResult(metrics, base, reference, dict(stages.cached), dict(stages.seconds), describe_data(splits),
                     deployed if kept else None, example if kept else None, tags, baseline_tags, ctx.epochs_run)
