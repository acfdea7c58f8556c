"""The prune stage's cache and `pipeline.run` itself, in-process on the digits set cut to 200 images (found by mutation
testing): what a loaded stage restores, what a run hands back, and the settings only some runs use (export, rewind,
train.trainable, quantize_then_prune). Each run takes well under a second once torch is warm."""

from __future__ import annotations

import copy
import shutil
import threading
import time

import pytest
import torch
from omegaconf import OmegaConf

from pqsweep import measure, pipeline, weights
from pqsweep.cache import BaselineCache, MeasuredCache, PrunedCache, baseline_key, measured_key, pruned_key

from nets import context, loader, small_cnn, wide_convnet

# A whole run in about a second: 144 / 16 / 40 images, one epoch, two timed calls.
FAST = ("dataset.num_samples=200", "train.epochs=1", "measure.warmup=0", "measure.repeats=2")
DIGITS_200 = {"train": 144, "val": 16, "test": 40, "num_classes": 10, "in_channels": 1, "image_size": 8}
LATENCY = {"latency_ms_p50", "latency_ms_p90"}  # timings: the one thing two equal runs may differ in


def equal_states(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> bool:
    a, b = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the prune stage's cache ---------------------------------------------------------------------------------------

def prune_stage(cfg, digits, model: torch.nn.Module):
    """pipeline.pruned on a fresh Context, as a run calls it: (model, cached, the global and the loader's random state
    after it)."""
    ctx = context(loader(digits.train, batch_size=256, shuffle=True), cfg.train)
    out, cached = pipeline.pruned(cfg, model, ctx)
    return out, cached, torch.get_rng_state(), ctx.loaders["train"].generator.get_state()


def test_the_prune_stage_is_computed_once_then_loaded_with_the_random_state_it_left(make_cfg, digits, caplog):
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_epochs=1")
    cache, key = PrunedCache(cfg.cache.dir), pruned_key(cfg)
    torch.manual_seed(1)
    first, cached, rng, loader_rng = prune_stage(cfg, digits, small_cnn())
    assert cached is False
    assert measure.parameter_counts(first)["sparsity"] == pytest.approx(0.5, abs=1e-3)

    given = small_cnn()
    untouched = copy.deepcopy(given.state_dict())
    torch.manual_seed(2)  # another state going in: the loaded stage must leave the one the computed stage left
    with caplog.at_level("INFO", logger="pqsweep.pipeline"):
        again, cached, rng_again, loader_rng_again = prune_stage(cfg, digits, given)
    assert cached is True and again is not given
    assert equal_states(again, first) and equal_states(given, untouched)  # a copy is loaded, not the model given
    assert torch.equal(rng_again, rng) and torch.equal(loader_rng_again, loader_rng)
    assert not again.training and next(again.parameters()).device.type == "cpu"
    assert caplog.messages == [f"pruned {key}: loaded from cache {cache.path(key)} (pruned and fine-tuned nothing)"]
    # the entry says which pruning made it, for whoever opens the cache folder
    assert cache.load(key)["config"] == OmegaConf.to_yaml(cfg.pruning)


def test_a_structurally_pruned_stage_is_loaded_with_its_smaller_layers(make_cfg, digits):
    cfg = make_cfg("pruning=l1_filter", "pruning.amount=0.5", "train.finetune_epochs=0")
    first, cached, _, _ = prune_stage(cfg, digits, small_cnn())
    assert cached is False
    shapes = weights.structure(first)
    assert (shapes["0"]["out_channels"], shapes["3"]["out_channels"], shapes["8"]["in_features"]) == (4, 8, 128)
    again, cached, _, _ = prune_stage(cfg, digits, small_cnn())  # a full-size net: the entry gives it the shapes
    assert cached is True and weights.structure(again) == shapes and equal_states(again, first)
    x = digits.test.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(again(x), first(x))


def test_a_trial_that_waited_for_the_prune_lock_takes_the_stage_another_trial_saved(make_cfg, digits, tmp_path):
    # The other trial holds this key's lock and saves its entry 1 s later (the entry made beforehand in another
    # cache folder: the key does not depend on cache.dir). A trial that did not wait would find nothing and prune.
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_epochs=0")
    other = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_epochs=0",
                     f"cache.dir={tmp_path}/other")
    theirs, _, _, _ = prune_stage(other, digits, small_cnn())
    cache, key = PrunedCache(cfg.cache.dir), pruned_key(cfg)
    holding = threading.Event()

    def other_trial():
        with cache.lock(key):
            holding.set()
            time.sleep(1.0)
            shutil.copy(PrunedCache(other.cache.dir).path(key), cache.path(key))

    thread = threading.Thread(target=other_trial)
    thread.start()
    assert holding.wait(30)
    ours, cached, _, _ = prune_stage(cfg, digits, small_cnn())
    thread.join()
    assert cached is True and equal_states(ours, theirs)


def test_an_entry_that_does_not_fit_the_model_is_pruned_again_from_the_model_as_given(make_cfg, digits, caplog):
    # The key names the model by its config, so an edit to the model's code leaves an entry that no longer fits:
    # here the entry is small_cnn's and the model wide_convnet, whose first conv and both Linears take the entry's
    # shapes before loading the weights fails.
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_epochs=0")
    key = pruned_key(cfg)
    prune_stage(cfg, digits, small_cnn())
    given = wide_convnet()
    expected = pipeline.prune_and_finetune(cfg, copy.deepcopy(given), context(loader(digits.train), cfg.train))
    with caplog.at_level("WARNING", logger="pqsweep.pipeline"):
        out, cached, _, _ = prune_stage(cfg, digits, given)
    assert cached is False and equal_states(out, expected)
    assert caplog.messages == [f"pruned {key}: cached entry does not fit the model (Error(s) in loading state_dict "
                               "for Sequential:); pruning again"]
    assert PrunedCache(cfg.cache.dir).load(key)["structure"] == weights.structure(expected)  # replaced
    assert prune_stage(cfg, digits, wide_convnet())[1] is True


# --- run -----------------------------------------------------------------------------------------------------------

def test_a_run_hands_back_its_metrics_its_baseline_its_data_and_the_model_as_deployed(make_cfg):
    cfg = make_cfg(*FAST, "pruning=global_magnitude", "pruning.amount=0.5", "quantization=fp16",
                   "tracking.log_model=true")
    result = pipeline.run(cfg)
    m, b = result.metrics, result.baseline_metrics
    assert set(m) == set(b) | {"params_trainable", "top1_delta", "reduction_factor", "reduction_factor_gzip",
                               "baseline_top1"}
    assert b == MeasuredCache(cfg.cache.dir).load(measured_key(cfg))["metrics"]
    # sizes as stored: fp32 dense, then fp16 with half its weights zero (gzip shows the zeros)
    assert (b["size_mb"], b["params_nonzero"], b["macs"]) == (0.076621, 18346.0, 40064.0)
    assert (m["size_mb"], m["params_nonzero"], m["macs"]) == (0.040141, 9222.0, 40064.0)
    assert m["size_gzip_mb"] == measure.sizes(result.model)["size_gzip_mb"] < b["size_gzip_mb"]
    assert m["reduction_factor"] == 0.076621 / 0.040141
    assert m["reduction_factor_gzip"] == b["size_gzip_mb"] / m["size_gzip_mb"]
    assert m["baseline_top1"] == b["top1"] and m["top1_delta"] == m["top1"] - b["top1"]
    assert (b["top1"], m["top1"]) == (7.5, 10.0)
    assert m["params_trainable"] == 18346.0  # every parameter of the float model trains (train.trainable unset)
    assert result.stages_cached == {"baseline_metrics": False, "prune": False}
    assert result.data == DIGITS_200

    base = result.baseline
    entry = BaselineCache(cfg.cache.dir).load(baseline_key(cfg))
    assert base.key == baseline_key(cfg) and base.cached is False and len(base.history) == 1
    assert equal_states(base.state, entry["state_dict"])  # the baseline as trained, untouched by the pruning after it

    splits, loaders = pipeline.load_data(cfg)
    assert torch.equal(result.example, splits.test[0][0][None])  # one test image
    assert measure.accuracy(result.model, loaders["test"])["top1"] == m["top1"]  # the model the metrics are of
    assert {w.tensor().dtype for w in weights.stored_weights(result.model)} == {torch.float16}

    again = pipeline.run(cfg)
    assert again.stages_cached == {"baseline_metrics": True, "prune": True} and again.baseline.cached is True
    assert {k: v for k, v in again.metrics.items() if k not in LATENCY} == \
           {k: v for k, v in m.items() if k not in LATENCY}


def test_params_trainable_counts_what_train_trainable_names_and_no_model_is_kept_unless_asked(make_cfg):
    result = pipeline.run(make_cfg(*FAST, "train.trainable=[\"10\"]"))  # the last Linear: 64 x 10 + 10
    assert result.metrics["params_trainable"] == 650.0 and result.metrics["params_total"] == 18346.0
    assert result.model is None and result.example is None  # tracking.log_model=false


def test_a_run_that_quantizes_then_prunes_reports_no_prune_stage(make_cfg):
    result = pipeline.run(make_cfg(*FAST, "pruning=global_magnitude", "quantization=static_int8",
                                   "quantization.order=quantize_then_prune", "quantization.calibration_batches=1"))
    assert result.stages_cached == {"baseline_metrics": False}  # nothing cached in this order, so nothing to say
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert result.metrics["params_trainable"] == 18346.0  # of the float model: the int8 one has no parameters


def test_a_run_with_export_writes_the_model_where_it_is_told_and_checks_it(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "export=torchscript")
    result = pipeline.run(cfg, artifact_dir=tmp_path / "artifacts")
    assert (tmp_path / "artifacts" / "model.pt").is_file()
    assert result.metrics["export_max_abs_diff"] == 0.0  # fp32 TorchScript reproduces eager exactly
    with pytest.raises(ValueError, match=r"^export=torchscript: run\(cfg, artifact_dir=\.\.\.\) needs a directory "
                                         r"to write to$"):
        pipeline.run(cfg)


def test_rewind_reinit_sets_the_survivors_back_to_the_weights_the_run_started_from(make_cfg):
    cfg = make_cfg(*FAST, "pruning=iterative", "pruning.rewind=reinit", "pruning.rounds=1", "pruning.amount=0.5",
                   "train.finetune_epochs=0", "tracking.log_model=true")
    model = pipeline.run(cfg).model
    assert measure.parameter_counts(model)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    initial = small_cnn(cfg.train.seed).state_dict()  # what run builds after seed_everything(train.seed)
    for k, v in model.state_dict().items():
        kept = v != 0
        assert torch.equal(v[kept], initial[k][kept]), k  # the initial values, not the trained baseline's
