"""A whole run: what pipeline.run hands back, how it builds and measures each part (on the untrained small nets and
on digits cut to 200 images, about a second a run), and the run logged to a real MLflow store on temporary SQLite."""

from __future__ import annotations

import copy

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pqsweep import estimate, measure, pipeline, tracking, weights
from pqsweep.cli import run_and_log
from pqsweep.identity import stage_key
from pqsweep.metrics import METRICS
from pqsweep.runtimes import EXTRA, p50, p90
from pqsweep.tracking import resolve_uri

from nets import RecordingContext, compose_cfg, context, loader, small_cnn, stage_entry, wide_convnet

# A whole run in about a second: 144 / 16 / 40 images, one epoch, two timed calls.
FAST = ("dataset.num_samples=200", "train.epochs=1", "measure.warmup=0", "measure.repeats=2")
DIGITS_200 = {"train": 144, "val": 16, "test": 40, "num_classes": 10, "in_channels": 1, "image_size": 8}
LATENCY = {"latency_ms_p50", "latency_ms_p90"}  # timings: the one thing two equal runs may differ in


def equal_states(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> bool:
    a, b = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- what a run hands back ---------------------------------------------------------------------------------

def test_a_run_hands_back_its_metrics_its_baseline_its_data_and_the_model_as_deployed(make_cfg):
    cfg = make_cfg(*FAST, "pruning=global_magnitude", "pruning.amount=0.5", "quantization=fp16",
                   "tracking.log_model=true")
    result = pipeline.run(cfg)
    m, b = result.metrics, result.baseline_metrics
    assert set(m) == set(b) | {"params_trainable", "top1_delta", "reduction_factor", "reduction_factor_gzip",
                               "baseline_top1"}
    assert b == stage_entry(cfg, "baseline_metrics")["metrics"]
    # sizes as stored: fp32 dense, then fp16 with half its weights zero (gzip shows the zeros)
    assert (b["size_mb"], b["params_nonzero"], b["macs"]) == (0.076621, 18346.0, 40064.0)
    assert (m["size_mb"], m["params_nonzero"], m["macs"]) == (0.040141, 9222.0, 40064.0)
    assert m["size_gzip_mb"] == measure.sizes(result.model)["size_gzip_mb"] < b["size_gzip_mb"]
    assert m["reduction_factor"] == 0.076621 / 0.040141
    assert m["reduction_factor_gzip"] == b["size_gzip_mb"] / m["size_gzip_mb"]
    assert m["baseline_top1"] == b["top1"] and m["top1_delta"] == m["top1"] - b["top1"]
    assert (b["top1"], m["top1"]) == (7.5, 10.0)
    assert m["params_trainable"] == 18346.0  # every parameter of the float model trains (train.trainable unset)
    assert result.epochs_run == cfg.train.finetune_epochs
    assert result.stages_cached == {"data": False, "baseline": False, "baseline_metrics": False, "prune": False}
    assert result.data == DIGITS_200

    base = result.baseline
    entry = stage_entry(cfg, "baseline")
    assert base.key == stage_key(cfg, "baseline") and base.cached is False and len(base.history) == 1
    assert equal_states(base.state, entry["state_dict"])  # the baseline as trained, untouched by the pruning after it

    splits, loaders = pipeline.load_data(cfg)
    assert torch.equal(result.example, splits.test[0][0][None])  # one test image
    assert measure.accuracy(result.model, loaders["test"])["top1"] == m["top1"]  # the model the metrics are of
    assert {w.tensor().dtype for w in weights.stored_weights(result.model)} == {torch.float16}

    again = pipeline.run(cfg)
    assert again.stages_cached == dict.fromkeys(result.stages_cached, True) and again.baseline.cached is True
    assert {k: v for k, v in again.metrics.items() if k not in LATENCY} == \
           {k: v for k, v in m.items() if k not in LATENCY}


def test_params_trainable_counts_what_train_trainable_names_and_no_model_is_kept_unless_asked(make_cfg):
    result = pipeline.run(make_cfg(*FAST, "train.trainable=[\"10\"]"))  # the last Linear: 64 x 10 + 10
    assert result.metrics["params_trainable"] == 650.0 and result.metrics["params_total"] == 18346.0
    assert result.model is None and result.example is None  # tracking.log_model=false


def test_a_run_that_quantizes_then_prunes_reports_no_prune_stage(make_cfg):
    result = pipeline.run(make_cfg(*FAST, "pruning=global_magnitude", "quantization=static_int8",
                                   "quantization.order=quantize_then_prune", "quantization.calibration_batches=1"))
    assert "prune" not in result.stages_cached  # the prune stage is part of the trial in this order
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


# --- measuring, pruning, compressing -------------------------------------------------------------------------

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
        stages = pipeline.stages_of(cfg)
        deployed, float_model = pipeline.compress(cfg, stages, model, context(loader(digits.train), cfg.train))
        assert float_model is model and stages.cached == {}  # no stage in this order
        assert all(torch.equal(v, before[k]) for k, v in float_model.state_dict().items())  # pruned after quantizing
        assert {w.tensor().dtype for w in weights.stored_weights(deployed)} == {torch.qint8}
        assert measure.parameter_counts(deployed)["sparsity"] == pytest.approx(0.5, abs=1e-3)
        return deployed

    # random pruning draws its mask from the context's train.seed: another seed, other zeros
    assert not all(torch.equal(a, b) for a, b in zip(zeros(compressed(3)), zeros(compressed(4))))


def test_prune_then_quantize_prunes_once_then_loads_the_stage_and_quantizes_with_the_context(make_cfg, digits):
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", "quantization=static_int8",
                   "quantization.calibration_batches=2")
    model, stages = small_cnn(), [pipeline.stages_of(cfg) for _ in range(2)]
    results = [pipeline.compress(cfg, s, copy.deepcopy(model), context(loader(digits.train), cfg.train))
               for s in stages]
    assert [s.cached["prune"] for s in stages] == [False, True]
    (deployed, float_model), (_, loaded) = results
    assert measure.parameter_counts(float_model)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in float_model.state_dict().items())
    assert {w.tensor().dtype for w in weights.stored_weights(deployed)} == {torch.qint8}
    assert all((q & f).sum() == f.sum() for q, f in zip(zeros(deployed), zeros(float_model)))  # int8 keeps each zero


# --- the model and the data ---------------------------------------------------------------------------------

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
    from pqsweep.cache import Store

    cfg = make_cfg("dataset=digits")
    built = pipeline.load_splits(cfg)
    load, calls = Store.load, []

    def raced(self, key):  # the first look (before the lock) misses: the entry was being written then
        calls.append(key)
        return None if len(calls) == 1 else load(self, key)

    monkeypatch.setattr(Store, "load", raced)
    monkeypatch.setattr("pqsweep.data.digits", lambda _: pytest.fail("built again although another trial had"))
    again = pipeline.load_splits(cfg)
    assert len(calls) == 2 and torch.equal(again.test.tensors[0], built.test.tensors[0])


# --- logged to MLflow -------------------------------------------------------------------------------------------

def runs(cfg, stage: str):
    mlflow.set_tracking_uri(resolve_uri(cfg.tracking.uri))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    return MlflowClient().search_runs([experiment.experiment_id], f"tags.stage = '{stage}'")


def test_run_logs_metrics_params_tags_and_config(make_cfg):
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", "quantization=static_int8")
    returned = run_and_log(cfg)
    # beside its metrics, what computing each stage took (for the sweep's estimate of the time left)
    metrics = {k: v for k, v in returned.items() if not k.startswith(estimate.SECONDS)}
    assert set(estimate.stage_seconds(returned)) == {"data", "baseline", "baseline_metrics", "prune"}

    elsewhere = {name(r) for r in EXTRA for name in (p50, p90)}  # measure.runtimes=[eager]: tests/test_runtimes.py
    assert set(METRICS) - {"export_max_abs_diff"} - elsewhere == set(metrics)  # export=none
    # two epochs learn digits to 65.3 %; pruned to half, one epoch of fine-tuning and int8: measured 66.9 %
    assert metrics["top1"] >= metrics["baseline_top1"] - 2
    assert 0.5 <= metrics["sparsity"] <= 0.501  # int8 rounding may zero a few more weights, never fewer
    assert metrics["latency_ms_p50"] <= metrics["latency_ms_p90"]
    assert 2.55 < metrics["reduction_factor"] < 2.75  # int8 weights; measured 2.65: fp32 biases, scales, framing

    (trial,) = runs(cfg, "trial")
    assert trial.info.status == "FINISHED"
    params, tags = trial.data.params, trial.data.tags
    assert {params[g] for g in ("model", "dataset", "pruning", "quantization")} == {
        "cnn", "digits", "global_magnitude", "static_int8"
    }
    assert params["pruning.amount"] == "0.5" and params["train.epochs"] == "2"
    assert params["quantization.engine"] == "x86" and params["quantization.backend"] == "fx"
    assert tags["stage"] == "trial" and tags["sweep"] == "adhoc" and tags["baseline_cached"] == "false"
    assert trial.data.metrics["top1"] == pytest.approx(metrics["top1"])
    config_yaml = mlflow.artifacts.load_text(f"{trial.info.artifact_uri}/config.yaml")
    assert "global_magnitude" in config_yaml

    (baseline,) = runs(cfg, "baseline")
    assert baseline.data.tags["baseline_hash"] == tags["baseline_hash"]
    assert baseline.data.metrics["sparsity"] == 0.0
    losses = MlflowClient().get_metric_history(baseline.info.run_id, "train_loss")
    assert [m.step for m in losses] == [0, 1] and losses[1].value < losses[0].value  # two epochs, learning
    assert metrics["top1_delta"] == pytest.approx(metrics["top1"] - baseline.data.metrics["top1"])


def test_second_run_reuses_the_baseline_and_logs_it_once(make_cfg):
    run_and_log(make_cfg())
    second = run_and_log(make_cfg("quantization=fp16", "measure.repeats=3"))

    trials = runs(make_cfg(), "trial")
    assert len(trials) == 2
    assert {t.data.tags["baseline_cached"] for t in trials} == {"false", "true"}
    assert len(runs(make_cfg(), "baseline")) == 1
    assert second["size_mb"] < 0.53 * runs(make_cfg(), "baseline")[0].data.metrics["size_mb"]  # fp16: 0.524


def test_a_failing_run_is_recorded_as_failed(make_cfg):
    # AlexNet's 11x11 stride-4 stem cannot run on 8x8 digits: a real failure, raised inside the run once its option
    # file's fact (min_image_size: 63, which validate would refuse digits with) is overridden by a wrong one.
    cfg = make_cfg("model=alexnet", "model.min_image_size=1")
    with pytest.raises(RuntimeError):
        run_and_log(cfg)
    (trial,) = runs(cfg, "trial")
    assert trial.info.status == "FAILED"
    assert "RuntimeError" in trial.data.tags["error"]


def test_ctrl_c_marks_the_run_killed_not_failed(make_cfg):
    cfg = make_cfg()
    tracking.setup(cfg)
    with pytest.raises(KeyboardInterrupt):
        with tracking.task_run("interrupted", {"stage": "trial"}):
            raise KeyboardInterrupt
    (trial,) = runs(cfg, "trial")
    assert trial.info.status == "KILLED" and "error" not in trial.data.tags


def test_a_trial_does_not_depend_on_who_filled_the_cache(make_cfg):
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.7", "quantization=static_int8")
    first = run_and_log(cfg)  # trains the baseline, then prunes and fine-tunes
    again = run_and_log(cfg)  # loads it: fine-tuning and calibration must see the same batches
    for name in ("top1", "top5", "sparsity", "size_mb", "params_nonzero"):
        assert again[name] == first[name], name
