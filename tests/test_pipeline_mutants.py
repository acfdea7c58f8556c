"""What the pipeline's own tests left open (found by mutation testing), stage by stage on the untrained small nets:
which model each metric is measured on and with which settings, when the prune stage fine-tunes, what the baseline's
metrics cache hands back, and the order quantize_then_prune keeps."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from pqsweep import measure, pipeline, weights

from nets import RecordingContext, compose_cfg, context, loader, small_cnn, wide_convnet


@pytest.fixture
def recorded_latency(monkeypatch):
    """measure.latency replaced by a recorder of its arguments (the timing itself is measure.py's to test)."""
    calls = []

    def latency(model, example, threads, warmup, repeats):
        calls.append((model, example, threads, warmup, repeats))
        return {"latency_ms_p50": 1.0, "latency_ms_p90": 2.0}

    monkeypatch.setattr(measure, "latency", latency)
    return calls


def test_measure_all_measures_the_deployed_model_and_counts_macs_on_the_float_one(digits, recorded_latency):
    deployed, float_model = small_cnn(), wide_convnet()  # different nets, so each metric shows whose it is
    loaders = {"test": loader(digits.test, batch_size=128)}
    example = digits.test[0][0][None]
    mcfg = compose_cfg("measure.threads=3", "measure.warmup=4", "measure.repeats=5").measure
    metrics = pipeline.measure_all(deployed, float_model, loaders, example, mcfg)

    assert metrics["macs"] == measure.macs(float_model, example) != measure.macs(deployed, example)
    accuracy = measure.accuracy(deployed, loaders["test"])
    assert (metrics["top1"], metrics["top5"]) == (accuracy["top1"], accuracy["top5"])
    assert {k: metrics[k] for k in measure.sizes(deployed)} == measure.sizes(deployed)
    assert {k: metrics[k] for k in measure.parameter_counts(deployed)} == measure.parameter_counts(deployed)
    ((timed, timed_example, threads, warmup, repeats),) = recorded_latency
    assert timed is deployed and torch.equal(timed_example, example) and (threads, warmup, repeats) == (3, 4, 5)
    assert metrics["latency_ms_p50"] == 1.0 and metrics["latency_ms_p90"] == 2.0


def test_measure_all_drops_top5_only_where_measure_top5_is_off(digits, recorded_latency):
    loaders, example = {"test": loader(digits.test)}, digits.test[0][0][None]
    model = small_cnn()
    assert "top5" in pipeline.measure_all(model, model, loaders, example, compose_cfg().measure)
    without = pipeline.measure_all(model, model, loaders, example, compose_cfg("measure.top5=false").measure)
    assert "top5" not in without and "top1" in without


def test_the_baseline_metrics_are_measured_once_then_loaded(make_cfg, digits, recorded_latency):
    cfg = make_cfg()
    model, loaders, example = small_cnn(), {"test": loader(digits.test)}, digits.test[0][0][None]
    first, cached = pipeline.measured(cfg, model, loaders, example)
    assert not cached and first["macs"] == measure.macs(model, example)
    again, cached = pipeline.measured(cfg, wide_convnet(), loaders, example)  # another model: only the key counts
    assert cached and again == first
    assert len(recorded_latency) == 1


# --- when the prune stage fine-tunes -------------------------------------------------------------------------------

def prune_stage(digits, *overrides: str) -> tuple[RecordingContext, torch.nn.Module]:
    cfg = compose_cfg(*overrides)
    ctx = context(loader(digits.train, shuffle=True), cfg.train, kind=RecordingContext)
    model = small_cnn().train()
    return ctx, pipeline.prune_and_finetune(cfg, model, ctx)


@pytest.mark.parametrize("overrides, tunes", [
    (["pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_epochs=1"], 1),
    (["pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_epochs=0"], 0),  # none asked for
    (["pruning=none", "train.finetune_epochs=1"], 0),  # nothing removed
], ids=["pruned", "no_epochs", "nothing_pruned"])
def test_the_prune_stage_fine_tunes_once_and_only_what_it_pruned(digits, overrides, tunes):
    ctx, model = prune_stage(digits, *overrides)
    assert len(ctx.seen) == tunes
    if tunes:
        assert measure.parameter_counts(ctx.seen[0])["sparsity"] == pytest.approx(0.5, abs=1e-3)  # after pruning
    assert not model.training and next(model.parameters()).device.type == "cpu"


def zeros(model: torch.nn.Module) -> list[torch.Tensor]:
    return [w.tensor() == 0 for w in weights.stored_weights(model)]


def test_the_prune_stage_hands_the_pruner_its_context(digits):
    # random pruning draws its mask from the context's train.seed: another seed, other zeros
    masks = [zeros(prune_stage(digits, "pruning=random", "pruning.amount=0.5", "train.finetune_epochs=0",
                               f"train.seed={seed}")[1]) for seed in (3, 4)]
    assert not all(torch.equal(a, b) for a, b in zip(*masks))


def test_quantize_then_prune_quantizes_with_the_context_then_prunes_the_stored_weights_with_it(digits):
    def compressed(seed: int):
        cfg = compose_cfg("pruning=random", "pruning.amount=0.5", "quantization=static_int8",
                          "quantization.order=quantize_then_prune", "quantization.calibration_batches=2",
                          f"train.seed={seed}")
        model = small_cnn()
        before = copy.deepcopy(model.state_dict())
        deployed, float_model, cached = pipeline.compress(cfg, model, context(loader(digits.train), cfg.train))
        assert float_model is model and cached is None  # nothing cached in this order
        assert all(torch.equal(v, before[k]) for k, v in float_model.state_dict().items())  # pruned after quantizing
        assert {w.tensor().dtype for w in weights.stored_weights(deployed)} == {torch.qint8}
        assert measure.parameter_counts(deployed)["sparsity"] == pytest.approx(0.5, abs=1e-3)
        return deployed

    # random pruning draws its mask from the context's train.seed: another seed, other zeros
    assert not all(torch.equal(a, b) for a, b in zip(zeros(compressed(3)), zeros(compressed(4))))


def test_prune_then_quantize_prunes_once_then_loads_the_stage_and_quantizes_with_the_context(make_cfg, digits):
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", "quantization=static_int8",
                   "quantization.calibration_batches=2")
    model = small_cnn()
    results = [pipeline.compress(cfg, copy.deepcopy(model), context(loader(digits.train), cfg.train))
               for _ in range(2)]
    assert [cached for _, _, cached in results] == [False, True]
    (deployed, float_model, _), (_, loaded, _) = results
    assert measure.parameter_counts(float_model)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in float_model.state_dict().items())
    assert {w.tensor().dtype for w in weights.stored_weights(deployed)} == {torch.qint8}
    assert all((q & f).sum() == f.sum() for q, f in zip(zeros(deployed), zeros(float_model)))  # int8 keeps each zero


# --- the model and the baseline --------------------------------------------------------------------------------

built: list[dict] = []


def recording_factory(**kwargs) -> torch.nn.Module:
    """A model factory (what `model._target_` names) that records what the pipeline asked of it."""
    built.append(kwargs)
    return small_cnn()


def test_the_model_is_built_for_the_data_and_as_pretrained_as_the_config_says(digits, monkeypatch):
    monkeypatch.setattr(f"{__name__}.built", [])
    for pretrained in (True, False):
        cfg = compose_cfg()
        cfg.model._target_, cfg.model.pretrained = f"{__name__}.recording_factory", pretrained
        pipeline.build_model(cfg, digits)
    assert built == [{"num_classes": 10, "in_channels": 1, "pretrained": True},
                     {"num_classes": 10, "in_channels": 1, "pretrained": False}]


def test_the_baseline_says_in_its_log_and_its_cache_entry_what_it_did(make_cfg, digits, caplog):
    from pqsweep.cache import BaselineCache, baseline_key

    untrained, trained = make_cfg("train.epochs=0"), make_cfg("train.epochs=1")
    loaders = {"train": loader(digits.train, batch_size=256)}
    key, path = baseline_key(untrained), BaselineCache(untrained.cache.dir).path(baseline_key(untrained))
    with caplog.at_level("INFO", logger="pqsweep.pipeline"):
        assert pipeline.baseline(untrained, small_cnn(), loaders).cached is False
        assert pipeline.baseline(untrained, small_cnn(), loaders).cached is True
        assert len(pipeline.baseline(trained, small_cnn(), loaders).history) == 1
    assert caplog.messages == [f"baseline {key}: train.epochs=0, the untrained model is the baseline",
                               f"baseline {key}: loaded from cache {path} (trained nothing)",
                               f"baseline {baseline_key(trained)}: not in cache, training 1 epochs"]
    # the entry says what it was trained from, for whoever opens the cache folder
    assert BaselineCache(untrained.cache.dir).load(key)["config"] == OmegaConf.to_yaml(untrained)


def test_the_training_loader_shuffles_in_the_order_train_seed_gives_and_the_others_keep_theirs(make_cfg):
    def first_batches(seed: int, noise: int):
        _, loaders = pipeline.load_data(make_cfg(f"train.seed={seed}", "train.batch_size=16"))
        torch.manual_seed(noise)  # the global generator must not matter: the loader has its own
        return {name: next(iter(loaders[name]))[1] for name in ("train", "val", "test")}, loaders

    (a, loaders), (b, _), (c, _) = first_batches(0, 1), first_batches(0, 2), first_batches(1, 1)
    assert torch.equal(a["train"], b["train"]) and not torch.equal(a["train"], c["train"])
    assert len(a["train"]) == 16
    in_order = torch.tensor([loaders["train"].dataset[i][1] for i in range(16)])
    assert not torch.equal(a["train"], in_order)  # shuffled
    for name in ("val", "test"):  # in order, at measure.eval_batch_size
        assert len(a[name]) == min(256, len(loaders[name].dataset))
        assert torch.equal(a[name], torch.tensor([loaders[name].dataset[i][1] for i in range(len(a[name]))]))


def test_a_trial_that_waited_for_the_data_lock_takes_the_splits_another_trial_built(make_cfg, monkeypatch):
    from pqsweep.cache import DataCache

    cfg = make_cfg("dataset=digits")
    built = pipeline.load_splits(cfg)
    load, calls = DataCache.load, []

    def raced(self, key):  # the first look (before the lock) misses: the entry was being written then
        calls.append(key)
        return None if len(calls) == 1 else load(self, key)

    monkeypatch.setattr(DataCache, "load", raced)
    monkeypatch.setattr("pqsweep.data.digits", lambda _: pytest.fail("built again although another trial had"))
    again = pipeline.load_splits(cfg)
    assert len(calls) == 2 and torch.equal(again.test.tensors[0], built.test.tensors[0])
