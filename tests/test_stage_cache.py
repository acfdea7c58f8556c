"""The prune stage and the baseline's metrics, computed once and shared: a trial's results are the same whether its
stages were computed or loaded, and the keys change with what shapes each stage and nothing else."""

from __future__ import annotations

import pytest
import torch

from pqsweep import pipeline
from pqsweep.cache import PrunedCache, measured_key, pruned_key

SAME = ("top1", "top5", "sparsity", "size_mb", "size_gzip_mb", "size_sparse_mb", "params_total", "params_nonzero",
        "macs")


def same_results(first, again):
    for name in SAME:
        assert again.metrics[name] == first.metrics[name], name


@pytest.mark.parametrize("pruning", [
    ["pruning=global_magnitude", "pruning.amount=0.7"],
    ["pruning=l1_filter", "pruning.amount=0.5"],  # changes layer shapes: replayed from numbers, not a pickle
    ["pruning=iterative", "pruning.amount=0.8", "pruning.rounds=2"],
], ids=["unstructured", "filters", "iterative"])
def test_a_trial_is_the_same_whether_its_prune_stage_was_computed_or_loaded(make_cfg, pruning, caplog):
    cfg = make_cfg(*pruning, "quantization=static_int8", "quantization.calibration_batches=2")
    first = pipeline.run(cfg)  # prunes, fine-tunes, then calibrates from the training loader
    with caplog.at_level("INFO", logger="pqsweep.pipeline"):
        again = pipeline.run(cfg)  # loads it, with the random state the stage left: calibration sees the same batches
    assert first.stages_cached["prune"] is False and again.stages_cached["prune"] is True
    assert "pruned and fine-tuned nothing" in caplog.text and "finetune" not in caplog.text.replace("fine-tuned", "")
    same_results(first, again)
    entry = PrunedCache(cfg.cache.dir).load(pruned_key(cfg))  # tensors and numbers only: weights_only loads it
    assert set(entry["structure"]) and all(isinstance(v, int) for s in entry["structure"].values() for v in s.values())


def test_every_precision_of_one_sparsity_shares_its_prune_stage(make_cfg):
    runs = [pipeline.run(make_cfg("pruning=global_magnitude", "pruning.amount=0.5", f"quantization={q}"))
            for q in ("none", "fp16", "static_int8")]
    assert [r.stages_cached["prune"] for r in runs] == [False, True, True]
    assert runs[0].metrics["sparsity"] == runs[1].metrics["sparsity"]
    assert [r.stages_cached["baseline_metrics"] for r in runs] == [False, True, True]
    assert runs[2].baseline_metrics == runs[0].baseline_metrics  # measured once, latency included


def test_the_keys_follow_what_shapes_each_stage(make_cfg, tmp_path):
    base = make_cfg("pruning=layer_magnitude", "pruning.amount=0.5")
    key = pruned_key(base)
    assert pruned_key(make_cfg("pruning=layer_magnitude", "pruning.amount=0.5", "quantization=fp16")) == key
    assert pruned_key(make_cfg("pruning=layer_magnitude", "pruning.amount=0.5", "measure.repeats=9")) == key
    for changed in (["pruning.amount=0.6"], ["train.finetune_epochs=3"], ["train.finetune_lr=0.001"],
                    ["train.seed=1"], ["train.epochs=3"], ["pruning=global_magnitude"]):
        assert pruned_key(make_cfg("pruning=layer_magnitude", "pruning.amount=0.5", *changed)) != key, changed

    amounts = tmp_path / "amounts.yaml"  # a file enters by its content: edited in place, the key changes
    amounts.write_text('"0": 0.3\n')
    with_file = pruned_key(make_cfg("pruning=layer_magnitude", f"pruning.layer_amounts={amounts}"))
    amounts.write_text('"0": 0.4\n')
    assert pruned_key(make_cfg("pruning=layer_magnitude", f"pruning.layer_amounts={amounts}")) != with_file

    assert measured_key(make_cfg("quantization=fp16")) == measured_key(make_cfg())
    assert measured_key(make_cfg("measure.repeats=9")) != measured_key(make_cfg())


def test_a_cached_stage_that_does_not_fit_the_model_is_computed_again(make_cfg, caplog):
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5")
    first = pipeline.run(cfg)
    cache, key = PrunedCache(cfg.cache.dir), pruned_key(cfg)
    entry = cache.load(key)
    entry["state_dict"] = {k: torch.zeros(1) for k in entry["state_dict"]}  # another model's weights
    cache.save(key, entry)
    again = pipeline.run(cfg)
    assert again.stages_cached["prune"] is False and "does not fit the model" in caplog.text
    same_results(first, again)
