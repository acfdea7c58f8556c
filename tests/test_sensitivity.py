"""The sensitivity scan on digits: its curves, its MLflow run, and its per-layer amounts taken by a later run."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra.utils import get_method
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pqsweep import measure, pipeline, sensitivity
from pqsweep.checks import ConfigError
from pqsweep.validate import validate
from pqsweep.reports.sensitivity import ALL_LAYERS, Curves, choose
from pqsweep.sensitivity import run_and_log, scan, write_amounts
from pqsweep.tracking import resolve_uri
from pqsweep.weights import prunable_layers

from nets import context, stage_entry

AMOUNTS = [0.0, 0.5, 0.9, 0.95]
NOT_PER_LAYER = ("pruning=global_magnitude is not allowed: pqsweep-sensitivity needs an option that takes per-layer "
                 "amounts (its file says per_layer: true), e.g. layer_magnitude or l1_filter")


@pytest.fixture
def scan_cfg(make_cfg):
    """make_cfg for pqsweep-sensitivity's own config (the pqsweep config with pruning=layer_magnitude)."""
    return lambda *overrides: make_cfg(*overrides, config_name="sensitivity")


def baseline_model(cfg):
    """The cached baseline, rebuilt independently of the scan, and the data loaders."""
    splits, loaders = pipeline.load_data(cfg)
    model = pipeline.build_model(cfg, splits)
    model.load_state_dict(stage_entry(cfg, "baseline")["state_dict"])
    return model.eval(), loaders


def pruned_baseline(cfg):
    """The cached baseline pruned by the configured option (as a run prunes it, before fine-tuning)."""
    model, loaders = baseline_model(cfg)
    return get_method(cfg.pruning._target_)(model, cfg.pruning, context(loaders["train"], cfg.train)), loaders


def test_curves_have_every_layer_and_amount_plus_all_layers(scan_cfg):
    cfg = scan_cfg(f"sensitivity.amounts={AMOUNTS}")
    assert cfg.pruning.name == "layer_magnitude"  # the scan's default option
    curves, amounts = scan(cfg)

    model, loaders = baseline_model(cfg)
    layers = [name for name, _ in prunable_layers(model)]
    assert curves.layers() == layers == list(amounts)
    assert len(curves.rows) == (len(layers) + 1) * len(AMOUNTS)
    assert {(r["layer"], r["amount"]) for r in curves.rows} == {(l, a) for l in layers + [ALL_LAYERS] for a in AMOUNTS}

    baseline_top1 = measure.accuracy(model, loaders["val"])["top1"]
    assert curves.baseline_top1 == pytest.approx(baseline_top1)
    for row in curves.rows:
        assert row["top1_drop"] == pytest.approx(baseline_top1 - row["top1"])
        if row["amount"] == 0:
            assert row["top1"] == pytest.approx(baseline_top1)
    # 95 % of the weights gone, no fine-tuning, from a 62.5 % baseline after two epochs: measured a drop of 52 pp
    # with every layer pruned (to chance) and of 45 pp for the worst single layer (conv "3")
    (all_95,) = [r for r in curves.rows if r["layer"] == ALL_LAYERS and r["amount"] == 0.95]
    assert all_95["top1_drop"] > 40
    assert max(r["top1_drop"] for r in curves.rows if r["layer"] != ALL_LAYERS and r["amount"] == 0.95) > 35


def test_choose_stops_at_the_first_amount_past_the_tolerance():
    curves = Curves(baseline_top1=90.0, baseline_key="k", baseline_cached=True)
    for amount, top1 in [(0.0, 90.0), (0.3, 89.5), (0.5, 88.0), (0.7, 89.8), (0.9, 50.0)]:
        curves.add("a", amount, top1)  # 0.7 recovers by noise after 0.5 broke
    for amount, top1 in [(0.0, 90.0), (0.3, 91.0), (0.5, 89.0)]:
        curves.add("b", amount, top1)
    curves.add("c", 0.5, 80.0)  # no amount passes
    curves.add(ALL_LAYERS, 0.5, 90.0)  # not a layer: chooses nothing
    assert choose(curves, tolerance=1.0) == {"a": 0.3, "b": 0.5, "c": 0.0}
    assert choose(curves, tolerance=0.4) == {"a": 0.0, "b": 0.3, "c": 0.0}


def test_the_test_split_is_refused(scan_cfg):
    with pytest.raises(ConfigError, match=r"^sensitivity.split=test is not allowed"):
        validate(scan_cfg("sensitivity.split=test"))
    with pytest.raises(ConfigError, match=r"^sensitivity.amounts="):
        validate(scan_cfg("sensitivity.amounts=[0,1.0]"))


def test_an_option_without_per_layer_amounts_is_refused(scan_cfg, monkeypatch, capsys, tmp_path):
    with pytest.raises(ConfigError, match=f"^{re.escape(NOT_PER_LAYER)}$"):
        scan(scan_cfg("pruning=global_magnitude"))
    # the command says so in one line, before it loads data or trains anything
    monkeypatch.setattr(sys, "argv", ["pqsweep-sensitivity", "pruning=global_magnitude"])
    with pytest.raises(SystemExit) as exit_:
        sensitivity.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f"pqsweep-sensitivity: error: {NOT_PER_LAYER}"]
    assert list(tmp_path.iterdir()) == []  # the test runs in tmp_path: nothing was written


def test_logged_run_and_amounts_round_trip_into_a_pruning_run(scan_cfg, make_cfg, tmp_path):
    output = tmp_path / "amounts.yaml"
    cfg = scan_cfg(f"sensitivity.output={output}")  # the default eleven amounts, tolerance 1 pp
    curves, amounts, written = run_and_log(cfg)

    assert Path(written) == output
    assert OmegaConf.to_container(OmegaConf.load(output)) == amounts
    assert any(0 < a < 1 for a in amounts.values())  # a scan that chose nothing would test no round trip

    mlflow.set_tracking_uri(resolve_uri(cfg.tracking.uri))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = MlflowClient().search_runs([experiment.experiment_id], "tags.stage = 'sensitivity'")
    assert run.info.status == "FINISHED" and run.data.params["pruning"] == "layer_magnitude"
    assert run.data.tags["method"] == "layer_magnitude"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"sensitivity.csv", "sensitivity.png", "layer_amounts.yaml", "config.yaml"} <= artifacts
    table = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/sensitivity.csv"))))
    assert len(table) == len(curves.rows) and set(table[0]) == {"layer", "amount", "top1", "top1_drop"}
    png = Path(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/sensitivity.png", dst_path=str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = OmegaConf.create(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/layer_amounts.yaml"))
    assert OmegaConf.to_container(logged) == amounts
    assert run.data.metrics["baseline_top1"] == pytest.approx(curves.baseline_top1)
    assert {run.data.metrics[f"chosen_amount/{layer}"] for layer in amounts} == set(amounts.values())

    # The pruner named by the config prunes each layer to its own amount ...
    pruned_cfg = make_cfg("pruning=layer_magnitude", f"pruning.layer_amounts={output}")
    model, loaders = pruned_baseline(pruned_cfg)
    for name, module in prunable_layers(model):
        assert int((module.weight == 0).sum()) == round(amounts[name] * module.weight.numel()), name
    # ... and the chosen_* metrics are that model's, on the scan's split
    counts = measure.parameter_counts(model)
    assert run.data.metrics["chosen_top1"] == pytest.approx(measure.accuracy(model, loaders["val"])["top1"])
    assert {k: run.data.metrics[f"chosen_{k}"] for k in counts} == pytest.approx(counts)

    # A whole run with that file trains nothing (the scan cached the baseline) and reaches the same sparsity.
    result = pipeline.run(pruned_cfg)
    assert result.baseline.cached
    assert result.metrics["sparsity"] == pytest.approx(run.data.metrics["chosen_sparsity"], abs=1e-9)


def test_l1_filter_scan_removes_filters_and_its_amounts_drive_l1_filter(scan_cfg, make_cfg, tmp_path):
    cfg = scan_cfg("pruning=l1_filter", "sensitivity.amounts=[0,0.5]", "sensitivity.tolerance=100")
    curves, amounts = scan(cfg)

    # The classifier ("10") keeps its outputs, so pruning it alone changes nothing: it is left out of the curves.
    # The convs and the hidden Linear lose filters / features.
    assert curves.layers() == ["0", "3", "8"] and amounts == {"0": 0.5, "3": 0.5, "8": 0.5}
    assert all(r["top1_drop"] == 0 for r in curves.rows if r["amount"] == 0)
    assert all(r["top1_drop"] != 0 for r in curves.rows if r["amount"] == 0.5)

    path = write_amounts(amounts, str(tmp_path / "filters.yaml"))
    pruned_cfg = make_cfg("pruning=l1_filter", "pruning.amount=0", f"pruning.layer_amounts={path}")
    before = {name: module.weight.shape[0] for name, module in prunable_layers(baseline_model(pruned_cfg)[0])}
    model, _ = pruned_baseline(pruned_cfg)
    after = {name: module.weight.shape[0] for name, module in prunable_layers(model)}
    assert after == {"0": 4, "3": 8, "8": 32, "10": before["10"]}  # half of 8, 16, 64 filters / features


@pytest.mark.slow
def test_command_writes_the_amounts_file(tmp_path):
    output = tmp_path / "amounts.yaml"
    command = [
        str(Path(sys.executable).parent / "pqsweep-sensitivity"),
        "train.epochs=1", "sensitivity.amounts=[0,0.5,0.9]", "sensitivity.tolerance=100",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache", f"sensitivity.output={output}",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    amounts = OmegaConf.to_container(OmegaConf.load(output))
    assert amounts == {"0": 0.9, "3": 0.9, "8": 0.9, "10": 0.9}  # any drop is within 100 pp: the largest amount
    assert f"wrote {output}; use it with: pqsweep pruning=layer_magnitude pruning.layer_amounts={output}" in done.stdout

    for bad, message in [
        ("sensitivity.split=test", "sensitivity.split=test is not allowed: must be one of val, train "
                                   "(test would leak into the amounts chosen)"),
        ("pruning=global_magnitude", NOT_PER_LAYER),
    ]:
        refused = subprocess.run([*command, bad], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [f"pqsweep-sensitivity: error: {message}"]


def test_a_second_scan_at_another_tolerance_loads_the_curves_and_prunes_nothing(scan_cfg, caplog):
    first, strict = scan(scan_cfg(f"sensitivity.amounts={AMOUNTS}", "sensitivity.tolerance=0"))
    with caplog.at_level("INFO", logger="pqsweep"):
        again, loose = scan(scan_cfg(f"sensitivity.amounts={AMOUNTS}", "sensitivity.tolerance=100"))
    assert not first.cached and again.cached and "pruned nothing" in caplog.text
    assert again.rows == first.rows and again.info == first.info and again.baseline_top1 == first.baseline_top1
    assert all(loose[layer] == max(AMOUNTS) for layer in loose)  # the choice is made again, at the new tolerance
    assert sum(strict.values()) < sum(loose.values())
    other, _ = scan(scan_cfg(f"sensitivity.amounts={AMOUNTS}", "sensitivity.split=train"))
    assert not other.cached  # another split: other curves
