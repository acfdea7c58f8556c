"""The stages of a run, computed once and shared: a trial's results are the same whether its stages were computed or
loaded, the random state each stage hands on is the same either way, parallel trials wait for each other's entries,
an entry that does not fit is computed again, and the keys change with what shapes each stage and nothing else."""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time

import pytest
import torch
from omegaconf import OmegaConf

from pqsweep import measure, pipeline, weights
from pqsweep.cache import Randomness, Stages, Store, store
from pqsweep.identity import stage_key, stage_keys
from pqsweep.stages import STAGES

from nets import compose_cfg, context, loader, small_cnn, stage_entry, stage_path, wide_convnet

# A whole run in about a second: 144 / 16 / 40 images, one epoch, two timed calls.
FAST = ("dataset.num_samples=200", "train.epochs=1", "measure.warmup=0", "measure.repeats=2")
SAME = ("top1", "top5", "sparsity", "size_mb", "size_gzip_mb", "size_sparse_mb", "params_total", "params_nonzero",
        "macs")
LATENCY = {"latency_ms_p50", "latency_ms_p90"}  # timings: the one thing two equal runs may differ in


def same_results(first, again):
    for name in SAME:
        assert again.metrics[name] == first.metrics[name], name


def equal_states(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> bool:
    a, b = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- a run's stages, computed or loaded ----------------------------------------------------------------------------

@pytest.mark.parametrize("pruning", [
    ["pruning=global_magnitude", "pruning.amount=0.7"],
    ["pruning=l1_filter", "pruning.amount=0.5"],  # changes layer shapes: replayed from numbers, not a pickle
    ["pruning=iterative", "pruning.amount=0.8", "pruning.rounds=2"],
    ["pruning=structured_unstructured", "pruning.structured=0.5", "pruning.unstructured=0.5"],  # two stages
], ids=["unstructured", "filters", "iterative", "structured_then_unstructured"])
def test_a_trial_is_the_same_whether_its_prune_stage_was_computed_or_loaded(make_cfg, pruning, caplog):
    cfg = make_cfg(*pruning, "quantization=static_int8", "quantization.calibration_batches=2")
    first = pipeline.run(cfg)  # prunes, fine-tunes, then calibrates from the training loader
    with caplog.at_level("INFO", logger="pqsweep"):
        again = pipeline.run(cfg)  # loads it, with the random state the stage left: calibration sees the same batches
    assert first.stages_cached["prune"] is False and again.stages_cached["prune"] is True
    assert "pruned and fine-tuned nothing" in caplog.text and "finetune" not in caplog.text.replace("fine-tuned", "")
    same_results(first, again)
    entry = stage_entry(cfg, "prune")  # tensors and numbers only: weights_only loads it
    assert set(entry["structure"]) and all(isinstance(v, int) for s in entry["structure"].values() for v in s.values())


@pytest.mark.parametrize("pruning", [
    ["pruning=iterative", "pruning.amount=0.8", "pruning.rounds=2", "pruning.rewind=reinit"],
    ["pruning=random", "pruning.amount=0.6"],
    ["pruning=structured_unstructured", "pruning.structured=0.25", "pruning.unstructured=0.5"],
], ids=["iterative_reinit", "random", "structured_unstructured"])
def test_a_trial_whose_baseline_was_loaded_measures_what_one_that_trained_it_measures(make_cfg, pruning):
    # The later stages draw from torch and the training loader (shuffled fine-tuning rounds, re-initialisation,
    # calibration batches); the baseline stage hands on a state re-seeded from train.seed, trained or loaded.
    cfg = make_cfg(*FAST, *pruning, "train.finetune_epochs=1", "quantization=static_int8",
                   "quantization.calibration_batches=2")
    trained = pipeline.run(cfg)
    for stage in ("structured", "prune", "baseline_metrics"):
        if stage_key(cfg, stage) is not None:
            stage_path(cfg, stage).unlink()
    loaded = pipeline.run(cfg)
    assert trained.baseline.cached is False and loaded.baseline.cached is True
    assert loaded.stages_cached["prune"] is False  # computed again, on the loaded baseline
    assert {k: v for k, v in loaded.metrics.items() if k not in LATENCY} == \
           {k: v for k, v in trained.metrics.items() if k not in LATENCY}


def test_the_baseline_hands_on_the_same_random_state_trained_or_loaded(make_cfg):
    # pipeline.run hides it (baseline_metrics re-seeds right after); a sensitivity scan's curves stage does not
    cfg = make_cfg(*FAST)

    def after_baseline():
        stages = pipeline.stages_of(cfg)
        splits, loaders = pipeline.load_data(cfg, stages)
        base = pipeline.baseline(cfg, stages, pipeline.build_model(cfg, splits), loaders)
        return base.cached, torch.get_rng_state(), loaders["train"].generator.get_state()

    trained, loaded = after_baseline(), after_baseline()
    assert trained[0] is False and loaded[0] is True
    assert torch.equal(trained[1], loaded[1]) and torch.equal(trained[2], loaded[2])


def test_every_precision_of_one_sparsity_shares_its_prune_stage(make_cfg):
    runs = [pipeline.run(make_cfg("pruning=global_magnitude", "pruning.amount=0.5", f"quantization={q}"))
            for q in ("none", "fp16", "static_int8")]
    assert [r.stages_cached["prune"] for r in runs] == [False, True, True]
    assert runs[0].metrics["sparsity"] == runs[1].metrics["sparsity"]
    assert [r.stages_cached["baseline_metrics"] for r in runs] == [False, True, True]
    assert runs[2].baseline_metrics == runs[0].baseline_metrics  # measured once, latency included


def test_a_structured_step_is_computed_once_per_structured_amount(make_cfg):
    # 2 x 2 structured x unstructured: two structured stages, four prune stages built on them
    runs = {(s, u): pipeline.run(make_cfg(*FAST, "pruning=structured_unstructured", f"pruning.structured={s}",
                                          f"pruning.unstructured={u}", "train.finetune_epochs=1"))
            for s in (0.25, 0.5) for u in (0.0, 0.5)}
    assert [r.stages_cached["structured"] for r in runs.values()] == [False, True, False, True]
    assert [r.stages_cached["prune"] for r in runs.values()] == [False] * 4
    for s in (0.25, 0.5):  # the points that share the structured stage remove the same filters
        assert runs[s, 0.0].metrics["params_total"] == runs[s, 0.5].metrics["params_total"]
        assert runs[s, 0.5].metrics["sparsity"] > runs[s, 0.0].metrics["sparsity"] + 0.3
    assert runs[0.5, 0.0].metrics["params_total"] < runs[0.25, 0.0].metrics["params_total"]


def test_a_run_without_a_structured_step_has_no_structured_stage(make_cfg):
    cfg = make_cfg(*FAST, "pruning=l1_filter")
    assert stage_key(cfg, "structured") is None
    assert "structured" not in pipeline.run(cfg).stages_cached


# --- the prune stage's entry ------------------------------------------------------------------------------------

def prune_stage(cfg, digits, model: torch.nn.Module):
    """pipeline.pruned on fresh stages and Context, as a run calls it: (model, cached, the global and the loader's
    random state after it)."""
    ctx = context(loader(digits.train, batch_size=256, shuffle=True), cfg.train)
    stages = Stages(cfg, Randomness(cfg.train.seed, {"train": ctx.loaders["train"].generator}))
    out = pipeline.pruned(cfg, stages, model, ctx)
    return out, stages.cached["prune"], torch.get_rng_state(), ctx.loaders["train"].generator.get_state()


def test_the_prune_stage_is_computed_once_then_loaded_with_the_random_state_it_left(make_cfg, digits, caplog):
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", "train.finetune_epochs=1")
    torch.manual_seed(1)
    first, cached, rng, loader_rng = prune_stage(cfg, digits, small_cnn())
    assert cached is False
    assert measure.parameter_counts(first)["sparsity"] == pytest.approx(0.5, abs=1e-3)

    given = small_cnn()
    untouched = copy.deepcopy(given.state_dict())
    torch.manual_seed(2)  # another state going in: the loaded stage must leave the one the computed stage left
    with caplog.at_level("INFO", logger="pqsweep.cache"):
        again, cached, rng_again, loader_rng_again = prune_stage(cfg, digits, given)
    assert cached is True and again is not given
    assert equal_states(again, first) and equal_states(given, untouched)  # a copy is loaded, not the model given
    assert torch.equal(rng_again, rng) and torch.equal(loader_rng_again, loader_rng)
    assert not again.training and next(again.parameters()).device.type == "cpu"
    key = stage_key(cfg, "prune")
    assert caplog.messages == [f"prune {key}: loaded from cache {stage_path(cfg, 'prune')} (pruned and fine-tuned "
                               "nothing)"]


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
    holding = threading.Event()

    def other_trial():
        with store(cfg, "prune").lock(stage_key(cfg, "prune")):
            holding.set()
            time.sleep(1.0)
            shutil.copy(stage_path(other, "prune"), stage_path(cfg, "prune"))

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
    prune_stage(cfg, digits, small_cnn())
    given = wide_convnet()
    expected = pipeline.prune_and_finetune(cfg, copy.deepcopy(given), context(loader(digits.train), cfg.train))
    with caplog.at_level("WARNING", logger="pqsweep.cache"):
        out, cached, _, _ = prune_stage(cfg, digits, given)
    assert cached is False and equal_states(out, expected)
    assert caplog.messages == [f"prune {stage_key(cfg, 'prune')}: cached entry does not fit the model (Error(s) in "
                               "loading state_dict for Sequential:); computing it again"]
    assert stage_entry(cfg, "prune")["structure"] == weights.structure(expected)  # replaced
    assert prune_stage(cfg, digits, wide_convnet())[1] is True


# --- the baseline and its metrics ----------------------------------------------------------------------------------

def test_the_baseline_metrics_are_measured_once_then_loaded(make_cfg, digits, recorded_latency):
    cfg = make_cfg()
    model, loaders, example = small_cnn(), {"test": loader(digits.test)}, digits.test[0][0][None]
    stages = pipeline.stages_of(cfg)
    first = pipeline.baseline_metrics(cfg, stages, model, loaders, example)
    assert stages.cached["baseline_metrics"] is False and first["macs"] == measure.macs(model, example)
    stages = pipeline.stages_of(cfg)
    again = pipeline.baseline_metrics(cfg, stages, wide_convnet(), loaders, example)  # only the key counts
    assert stages.cached["baseline_metrics"] is True and again == first
    assert len(recorded_latency) == 1


def test_the_baseline_says_in_its_log_and_its_cache_entry_what_it_did(make_cfg, digits, caplog):
    untrained, trained = make_cfg("train.epochs=0"), make_cfg("train.epochs=1")
    loaders = {"train": loader(digits.train, batch_size=256)}
    key, path = stage_key(untrained, "baseline"), stage_path(untrained, "baseline")

    def baseline(cfg):
        return pipeline.baseline(cfg, pipeline.stages_of(cfg), small_cnn(), loaders)

    with caplog.at_level("INFO", logger="pqsweep"):
        assert baseline(untrained).cached is False
        assert baseline(untrained).cached is True
        assert len(baseline(trained).history) == 1
    assert caplog.messages == [f"baseline {key}: train.epochs=0, the untrained model is the baseline",
                               f"baseline {key}: loaded from cache {path} (trained nothing)",
                               f"baseline {stage_key(trained, 'baseline')}: not in cache, training 1 epoch"]
    # the entry says what it was trained from, for whoever opens the cache folder
    assert stage_entry(untrained, "baseline")["config"] == OmegaConf.to_yaml(untrained)


@pytest.fixture
def cache_cfg(tmp_path):
    return lambda *overrides: compose_cfg("dataset=digits", "train.epochs=1", f"cache.dir={tmp_path}", *overrides)


def fresh_model(cfg, splits, seed: int):
    torch.manual_seed(seed)
    return pipeline.build_model(cfg, splits)


def test_baseline_is_trained_once_then_loaded(cache_cfg, tmp_path, caplog):
    cfg = cache_cfg()
    splits, loaders = pipeline.load_data(cfg)
    trainee = fresh_model(cfg, splits, seed=0)
    initial = copy.deepcopy(trainee.state_dict())
    first = pipeline.baseline(cfg, pipeline.stages_of(cfg), trainee, loaders)
    assert not first.cached and len(first.history) == 1
    assert not all(torch.equal(v, initial[k]) for k, v in first.state.items())  # it trained
    assert stage_path(cfg, "baseline").is_file()

    untouched = fresh_model(cfg, splits, seed=1)
    before = copy.deepcopy(untouched.state_dict())
    caplog.set_level(logging.INFO, logger="pqsweep")
    caplog.clear()
    second = pipeline.baseline(cfg, pipeline.stages_of(cfg), untouched, loaders)
    assert second.cached and second.key == first.key and second.history == first.history
    assert equal_states(second.state, first.state)
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())  # trained nothing
    assert "loaded from cache" in caplog.text and "training" not in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []  # written atomically


def test_baseline_cache_hits_and_misses_by_key(cache_cfg, tmp_path):
    def cached(*overrides) -> bool:
        cfg = cache_cfg("train.epochs=0", *overrides)  # an untrained baseline is cached like any other
        splits, loaders = pipeline.load_data(cfg)
        return pipeline.baseline(cfg, pipeline.stages_of(cfg), fresh_model(cfg, splits, 0), loaders).cached

    assert not cached()
    assert cached("train.finetune_epochs=0", "pruning=global_magnitude")
    assert not cached("train.seed=1")
    assert len(list(tmp_path.glob("baseline-*.pt"))) == 2


def test_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path):
    cache = Store(tmp_path / "cache", "baseline", STAGES["baseline"].holds)
    cache.save("k", {"state_dict": {"w": torch.ones(2)}, "history": []})
    with pytest.raises(Exception):
        cache.save("k", {"state_dict": {"w": torch.zeros(2)}, "history": [], "unpicklable": lambda: None})
    assert torch.equal(cache.load("k")["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in cache.dir.iterdir() if p.suffix == ".tmp"] == []
    assert cache.load("missing") is None


# --- the keys ------------------------------------------------------------------------------------------------------

SAME_BASELINE = ["measure.repeats=7", "measure.threads=2", "pruning=global_magnitude", "pruning=layer_magnitude",
                 "pruning.amount=0.3", "quantization=static_int8", "quantization=fp16", "train.finetune_epochs=5",
                 "train.finetune_lr=0.01", "dataset.root=/elsewhere", "dataset.download=true", "cache.dir=/elsewhere",
                 "tracking.experiment=other"]
NEW_BASELINE = ["train.epochs=3", "train.seed=1", "train.optimizer.lr=0.01", "train.batch_size=32",
                "model=resnet18_cifar", "dataset=mnist5k", "dataset.split_seed=1", "dataset.val_fraction=0.2",
                "device=cuda"]


@pytest.mark.parametrize("override", SAME_BASELINE)
def test_the_baseline_key_ignores_what_comes_after_baseline_training(override):
    assert stage_key(compose_cfg(override), "baseline") == stage_key(compose_cfg(), "baseline")


@pytest.mark.parametrize("override", NEW_BASELINE)
def test_the_baseline_key_changes_with_what_shapes_the_baseline(override):
    assert stage_key(compose_cfg(override), "baseline") != stage_key(compose_cfg(), "baseline")


def test_a_baseline_trains_alike_on_any_gpu():
    assert stage_key(compose_cfg("device=cuda:1"), "baseline") == stage_key(compose_cfg("device=cuda"), "baseline")


def test_a_baseline_cached_before_the_stage_graph_keeps_its_key():
    # The keys of commit 07a9435 (before stages were declared): baselines cached then are found, not retrained
    assert stage_key(compose_cfg("sweep=mnist_cnn_sparsity_x_precision"), "baseline") == "eeb6c636aee958b0"
    key = stage_key(compose_cfg(), "baseline")
    assert key == stage_key(compose_cfg(), "baseline") and len(key) == 16 and int(key, 16) >= 0


def test_the_fake_set_retrains_for_another_image_size_and_a_real_set_does_not():
    fake = compose_cfg("dataset=fake", "dataset.num_samples=64", "dataset.image_size=32", "train.epochs=1")
    bigger = compose_cfg("dataset=fake", "dataset.num_samples=64", "dataset.image_size=48", "train.epochs=1")
    assert stage_key(bigger, "baseline") != stage_key(fake, "baseline")
    assert stage_key(bigger, "data") != stage_key(fake, "data")
    # a real set's image_size states a fact about its files: the images are what they are
    assert stage_key(compose_cfg("dataset.image_size=9"), "baseline") == stage_key(compose_cfg(), "baseline")


def test_the_later_keys_follow_what_shapes_each_stage(make_cfg, tmp_path):
    base = make_cfg("pruning=layer_magnitude", "pruning.amount=0.5")
    key = stage_key(base, "prune")
    assert stage_key(make_cfg("pruning=layer_magnitude", "pruning.amount=0.5", "quantization=fp16"), "prune") == key
    assert stage_key(make_cfg("pruning=layer_magnitude", "pruning.amount=0.5", "measure.repeats=9"), "prune") == key
    for changed in (["pruning.amount=0.6"], ["train.finetune_epochs=3"], ["train.finetune_lr=0.001"],
                    ["train.seed=1"], ["train.epochs=3"], ["pruning=global_magnitude"]):
        assert stage_key(make_cfg("pruning=layer_magnitude", "pruning.amount=0.5", *changed), "prune") != key, changed

    amounts = tmp_path / "amounts.yaml"  # a file enters by its content: edited in place, the key changes
    amounts.write_text('"0": 0.3\n')
    with_file = stage_key(make_cfg("pruning=layer_magnitude", f"pruning.layer_amounts={amounts}"), "prune")
    amounts.write_text('"0": 0.4\n')
    assert stage_key(make_cfg("pruning=layer_magnitude", f"pruning.layer_amounts={amounts}"), "prune") != with_file

    assert stage_key(make_cfg("quantization=fp16"), "baseline_metrics") == stage_key(make_cfg(), "baseline_metrics")
    assert stage_key(make_cfg("measure.repeats=9"), "baseline_metrics") != stage_key(make_cfg(), "baseline_metrics")

    grid = [make_cfg("pruning=structured_unstructured", f"pruning.unstructured={u}") for u in (0.2, 0.4)]
    assert stage_key(grid[0], "structured") == stage_key(grid[1], "structured")  # shared by the unstructured amounts
    assert stage_key(grid[0], "prune") != stage_key(grid[1], "prune")
    assert stage_keys(make_cfg("pruning=structured_unstructured", "pruning.structured=0.3"))["structured"] != \
           stage_key(grid[0], "structured")
