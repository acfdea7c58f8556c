"""One run: load data -> build model -> baseline (trained or cached) -> prune -> fine-tune -> quantize -> measure.

`run(cfg)` returns the trial's metrics and what its data were (numbers only; the deployed model too where
`tracking.log_model` asks for it); `pqsweep.tracking` logs them to MLflow.
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
from tqdm.auto import tqdm

from pqsweep import measure
from pqsweep.cache import (BaselineCache, DataCache, MeasuredCache, PrunedCache, baseline_key, data_key, measured_key,
                           pruned_key)
from pqsweep.config import Export, Order, validate
from pqsweep.data import DataSplits, limited
from pqsweep.weights import footprint, restore_structure, structure
from pqsweep.train import Context, fit, seed_everything, trainable_parameters

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
    data: dict[str, int] = field(default_factory=dict)  # split sizes and image shape (describe_data)
    model: nn.Module | None = None  # the model as deployed, kept only where tracking.log_model asks for it
    example: torch.Tensor | None = None  # one test input, beside `model`


def describe_data(splits: DataSplits) -> dict[str, int]:
    """What the run's data were, as the tracking logs each split: its size, the classes and the image shape."""
    return {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
            "num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": splits.image_size}


def load_splits(cfg: DictConfig) -> DataSplits:
    """The data set's splits, cut to dataset.num_samples; those held in memory come from the data cache after
    their first build."""
    return limited(built_splits(cfg), cfg.dataset.num_samples)


def built_splits(cfg: DictConfig) -> DataSplits:
    cache, key = DataCache(cfg.cache.dir), data_key(cfg)
    entry = cache.load(key)
    if entry is not None:
        return DataSplits.from_tensors(entry)
    with cache.lock(key):
        entry = cache.load(key)  # a parallel trial may have built it while this one waited
        if entry is not None:
            return DataSplits.from_tensors(entry)
        splits: DataSplits = get_method(cfg.dataset._target_)(cfg.dataset)
        tensors = splits.tensors()
        if tensors is not None:
            cache.save(key, tensors)
    return splits


def load_data(cfg: DictConfig) -> tuple[DataSplits, dict[str, DataLoader]]:
    splits = load_splits(cfg)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loaders = {
        "train": DataLoader(splits.train, batch_size=cfg.train.batch_size, shuffle=True, generator=generator),
        "val": DataLoader(splits.val, batch_size=cfg.measure.eval_batch_size),
        "test": DataLoader(splits.test, batch_size=cfg.measure.eval_batch_size),
    }
    return splits, loaders


def build_model(cfg: DictConfig, splits: DataSplits) -> nn.Module:
    factory = get_method(cfg.model._target_)
    return factory(num_classes=splits.num_classes, in_channels=splits.in_channels, pretrained=cfg.model.pretrained)


def baseline(cfg: DictConfig, model: nn.Module, loaders: dict[str, DataLoader]) -> Baseline:
    """Train the baseline, or load it from the cache when the settings that shape it were trained before."""
    cache = BaselineCache(cfg.cache.dir)
    key = baseline_key(cfg)
    with cache.lock(key):
        entry = cache.load(key)
        if entry is not None:
            log.info("baseline %s: loaded from cache %s (trained nothing)", key, cache.path(key))
            return Baseline(key, entry["state_dict"], cached=True, history=entry["history"])
        if cfg.train.epochs == 0:
            log.info("baseline %s: train.epochs=0, the untrained model is the baseline", key)
        else:
            log.info("baseline %s: not in cache, training %d epochs", key, cfg.train.epochs)
        history = fit(model, loaders["train"], cfg.train, cfg.train.epochs, device=cfg.device, desc="baseline")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        cache.save(key, {"state_dict": state, "history": history, "config": OmegaConf.to_yaml(cfg)})
        return Baseline(key, state, cached=False, history=history)


def prune_and_finetune(cfg: DictConfig, model: nn.Module, ctx: Context) -> nn.Module:
    """Prune (a method may fine-tune between its own stages), then fine-tune once more if anything was removed."""
    before = footprint(model)
    model = get_method(cfg.pruning._target_)(model, cfg.pruning, ctx)
    if footprint(model) != before and cfg.train.finetune_epochs > 0:
        ctx.finetune(model)
    return model.cpu().eval()


def quantize(cfg: DictConfig, model: nn.Module, ctx: Context) -> nn.Module:
    return get_method(cfg.quantization._target_)(model.cpu().eval(), cfg.quantization, ctx)


def pruned(cfg: DictConfig, model: nn.Module, ctx: Context) -> tuple[nn.Module, bool]:
    """(prune_and_finetune's model, whether it came from the cache). The cache holds it under the hash of what
    shaped it, with the random state the stage left, so what follows (calibration) sees the same batches."""
    cache, key = PrunedCache(cfg.cache.dir), pruned_key(cfg)
    with cache.lock(key):  # parallel trials that share a sparsity prune and fine-tune it once
        entry = cache.load(key)
        if entry is not None:
            loaded = copy.deepcopy(model)
            try:
                restore_structure(loaded, entry["structure"], entry["state_dict"])
                loaded.load_state_dict(entry["state_dict"])
                with torch.no_grad():
                    loaded.eval()(ctx.example.to(next(loaded.parameters()).device))  # the shapes fit each other
            except (KeyError, RuntimeError) as error:  # a model whose layers the entry does not describe
                log.warning("pruned %s: cached entry does not fit the model (%s); pruning again", key,
                            str(error).splitlines()[0][:200])
            else:
                torch.set_rng_state(entry["rng"])
                ctx.loaders["train"].generator.set_state(entry["loader_rng"])
                log.info("pruned %s: loaded from cache %s (pruned and fine-tuned nothing)", key, cache.path(key))
                return loaded.cpu().eval(), True
        model = prune_and_finetune(cfg, model, ctx)
        cache.save(key, {"state_dict": model.state_dict(), "structure": structure(model),
                         "rng": torch.get_rng_state(), "loader_rng": ctx.loaders["train"].generator.get_state(),
                         "config": OmegaConf.to_yaml(cfg.pruning)})
        return model, False


def compress(cfg: DictConfig, model: nn.Module, ctx: Context) -> tuple[nn.Module, nn.Module, bool | None]:
    """(deployed model, its float counterpart, whether the prune stage was cached) in `quantization.order`.

    quantize_then_prune prunes the stored (e.g. int8) weights in their own domain, with no fine-tuning: a
    converted int8 model has no float weights to train, and its pruning is cheap, so it is not cached.
    """
    if cfg.quantization.order == Order.quantize_then_prune:
        deployed = quantize(cfg, model, ctx)
        deployed = get_method(cfg.pruning._target_)(deployed, cfg.pruning, ctx)
        return deployed, model, None
    model, cached = pruned(cfg, model, ctx)
    return quantize(cfg, model, ctx), model, cached


def evaluate(model: nn.Module, loader: DataLoader, desc: str) -> dict[str, float]:
    with tqdm(total=len(loader), desc=desc, unit="batch", leave=False) as bar:
        return measure.accuracy(model, loader, progress=bar)


def measured(cfg: DictConfig, model: nn.Module, loaders, example: torch.Tensor) -> tuple[dict[str, float], bool]:
    """The baseline's metrics, and whether they came from the cache (every trial of a sweep shares them)."""
    cache, key = MeasuredCache(cfg.cache.dir), measured_key(cfg)
    with cache.lock(key):
        entry = cache.load(key)
        if entry is not None:
            return dict(entry["metrics"]), True
        metrics = measure_all(model, model, loaders, example, cfg.measure)
        cache.save(key, {"metrics": metrics})
        return metrics, False


def measure_all(deployed: nn.Module, float_model: nn.Module, loaders, example: torch.Tensor, mcfg) -> dict[str, float]:
    """Every metric of a deployable model; MACs come from its float counterpart (quantized ops are not counted)."""
    metrics = evaluate(deployed, loaders["test"], "evaluate")
    if not mcfg.top5:
        metrics.pop("top5")
    metrics.update(measure.sizes(deployed))
    metrics.update(measure.parameter_counts(deployed))
    metrics["macs"] = measure.macs(float_model, example)
    metrics.update(measure.latency(deployed, example, mcfg.threads, mcfg.warmup, mcfg.repeats))
    return metrics


def run(cfg: DictConfig, artifact_dir: str | Path | None = None) -> RunResult:
    """One run; with `export` set, the compressed model is written to `artifact_dir` and checked there."""
    validate(cfg)
    seed_everything(cfg.train.seed)
    splits, loaders = load_data(cfg)
    model = build_model(cfg, splits)
    initial_state = copy.deepcopy(model.state_dict())
    base = baseline(cfg, model, loaders)
    model.load_state_dict(base.state)
    model.cpu().eval()
    example = next(iter(loaders["test"]))[0][:1]

    # The baseline as deployed at fp32, measured once per baseline and measurement setting.
    baseline_metrics, measured_cached = measured(cfg, model, loaders, example)

    # Same random state after the baseline whether it was trained here or loaded: a trial's result must not
    # depend on whether it was the one that filled the cache.
    seed_everything(cfg.train.seed)
    loaders["train"].generator.manual_seed(cfg.train.seed)
    ctx = Context(loaders, example, cfg.train, cfg.device, initial_state)
    deployed, compressed, prune_cached = compress(cfg, copy.deepcopy(model), ctx)
    metrics = measure_all(deployed, compressed, loaders, example, cfg.measure)
    trainable = trainable_parameters(compressed, cfg.train.trainable)  # of the float model: int8 ones train no more
    metrics["params_trainable"] = float(sum(p.numel() for _, p in trainable))

    if cfg.export != Export.none:
        from pqsweep.export import export  # onnx/onnxruntime load only when asked for

        if artifact_dir is None:
            raise ValueError(f"export={cfg.export.value}: run(cfg, artifact_dir=...) needs a directory to write to")
        metrics.update(export(deployed, example, cfg.export.value, Path(artifact_dir), cfg.quantization))

    metrics["top1_delta"] = metrics["top1"] - baseline_metrics["top1"]
    metrics["reduction_factor"] = baseline_metrics["size_mb"] / metrics["size_mb"]
    metrics["reduction_factor_gzip"] = baseline_metrics["size_gzip_mb"] / metrics["size_gzip_mb"]
    metrics["baseline_top1"] = baseline_metrics["top1"]
    stages = {"baseline_metrics": measured_cached} | ({} if prune_cached is None else {"prune": prune_cached})
    kept = cfg.tracking.log_model
    return RunResult(metrics, base, baseline_metrics, stages, describe_data(splits),
                     deployed if kept else None, example if kept else None)
