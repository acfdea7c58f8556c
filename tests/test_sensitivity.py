"""The sensitivity scan on digits: its curves, its MLflow run, and its per-layer amounts taken by a later run."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra.utils import get_method
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pqsweep import measure, pipeline
from pqsweep.cache import BaselineCache, baseline_key
from pqsweep.config import ConfigError, validate
from pqsweep.weights import prunable_layers
from pqsweep.sensitivity import Curves, choose, run_and_log, scan, write_amounts
from pqsweep.tracking import resolve_uri
from pqsweep.train import Context

AMOUNTS = [0.0, 0.5, 0.9, 0.95]


def baseline_model(cfg):
    """The cached baseline, rebuilt independently of the scan, and the data loaders."""
    splits, loaders = pipeline.load_data(cfg)
    model = pipeline.build_model(cfg, splits)
    model.load_state_dict(BaselineCache(cfg.cache.dir).load(baseline_key(cfg))["state_dict"])
    return model.eval(), loaders


def test_curves_have_every_layer_and_amount_plus_global(make_cfg):
    cfg = make_cfg(f"sensitivity.amounts={AMOUNTS}")
    curves, amounts = scan(cfg)

    model, loaders = baseline_model(cfg)
    layers = [name for name, _ in prunable_layers(model)]
    assert curves.layers() == layers == list(amounts)
    assert len(curves.rows) == (len(layers) + 1) * len(AMOUNTS)
    assert {(r["layer"], r["amount"]) for r in curves.rows} == {(l, a) for l in layers + ["global"] for a in AMOUNTS}

    baseline_top1 = measure.accuracy(model, loaders["val"])["top1"]
    assert curves.baseline_top1 == pytest.approx(baseline_top1)
    for row in curves.rows:
        assert row["top1_drop"] == pytest.approx(baseline_top1 - row["top1"])
        if row["amount"] == 0:
            assert row["top1"] == pytest.approx(baseline_top1)
    (global_95,) = [r for r in curves.rows if r["layer"] == "global" and r["amount"] == 0.95]
    assert global_95["top1_drop"] > 10  # 95 % of every weight gone, no fine-tuning
    assert max(r["top1_drop"] for r in curves.rows if r["layer"] != "global" and r["amount"] == 0.95) > 10


def test_choose_stops_at_the_first_amount_past_the_tolerance():
    curves = Curves(baseline_top1=90.0, baseline_key="k", baseline_cached=True)
    for amount, top1 in [(0.0, 90.0), (0.3, 89.5), (0.5, 88.0), (0.7, 89.8), (0.9, 50.0)]:
        curves.add("a", amount, top1)  # 0.7 recovers by noise after 0.5 broke
    for amount, top1 in [(0.0, 90.0), (0.3, 91.0), (0.5, 89.0)]:
        curves.add("b", amount, top1)
    curves.add("c", 0.5, 80.0)  # no amount passes
    curves.add("global", 0.5, 90.0)
    assert choose(curves, tolerance=1.0) == {"a": 0.3, "b": 0.5, "c": 0.0}
    assert choose(curves, tolerance=0.4) == {"a": 0.0, "b": 0.3, "c": 0.0}


def test_the_test_split_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"^sensitivity.split=test is not allowed"):
        validate(make_cfg("sensitivity.split=test"))
    with pytest.raises(ConfigError, match=r"^sensitivity.amounts="):
        validate(make_cfg("sensitivity.amounts=[0,1.0]"))


def test_logged_run_and_amounts_round_trip_into_a_pruning_run(make_cfg, tmp_path):
    output = tmp_path / "amounts.yaml"
    cfg = make_cfg(f"sensitivity.output={output}")  # the default eleven amounts, tolerance 1 pp
    curves, amounts, written = run_and_log(cfg)

    assert Path(written) == output
    assert OmegaConf.to_container(OmegaConf.load(output)) == amounts
    assert any(0 < a < 1 for a in amounts.values())  # a scan that chose nothing would test no round trip

    mlflow.set_tracking_uri(resolve_uri(cfg.tracking.uri))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = MlflowClient().search_runs([experiment.experiment_id], "tags.stage = 'sensitivity'")
    assert run.info.status == "FINISHED" and run.data.params["sensitivity.method"] == "magnitude"
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

    # The pruner named by the config prunes each layer to its own amount.
    pruned_cfg = make_cfg("pruning=layer_magnitude", f"pruning.layer_amounts={output}")
    model, loaders = baseline_model(pruned_cfg)
    ctx = Context(loaders, next(iter(loaders["val"]))[0][:1], pruned_cfg.train)
    model = get_method(pruned_cfg.pruning._target_)(model, pruned_cfg.pruning, ctx)
    for name, module in prunable_layers(model):
        weight = module.weight
        assert int((weight == 0).sum()) == round(amounts[name] * weight.numel()), name

    # A whole run with that file trains nothing (the scan cached the baseline) and reaches the same sparsity.
    result = pipeline.run(pruned_cfg)
    assert result.baseline.cached
    assert result.metrics["sparsity"] == pytest.approx(run.data.metrics["chosen_sparsity"], abs=1e-9)


def test_l1_filter_scan_removes_filters_and_its_amounts_drive_l1_filter(make_cfg, tmp_path):
    cfg = make_cfg("sensitivity.method=l1_filter", "sensitivity.amounts=[0,0.5]", "sensitivity.tolerance=100")
    curves, amounts = scan(cfg)

    # The classifier ("10") keeps its outputs; the convs and the hidden Linear lose filters / features.
    assert curves.layers() == ["0", "3", "8"] and amounts == {"0": 0.5, "3": 0.5, "8": 0.5}
    assert all(r["top1_drop"] == 0 for r in curves.rows if r["amount"] == 0)
    assert any(r["top1_drop"] != 0 for r in curves.rows if r["amount"] == 0.5 and r["layer"] != "global")

    path = write_amounts(amounts, str(tmp_path / "filters.yaml"))
    pruned_cfg = make_cfg("pruning=l1_filter", "pruning.amount=0", f"pruning.layer_amounts={path}")
    model, loaders = baseline_model(pruned_cfg)
    before = {name: module.weight.shape[0] for name, module in prunable_layers(model)}
    ctx = Context(loaders, next(iter(loaders["val"]))[0][:1], pruned_cfg.train)
    model = get_method(pruned_cfg.pruning._target_)(model, pruned_cfg.pruning, ctx)
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
    assert f"wrote {output}" in done.stdout

    refused = subprocess.run([*command, "sensitivity.split=test"], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "pqsweep-sensitivity: error: sensitivity.split=test is not allowed: must be one of val, train "
        "(test would leak into the amounts chosen)"
    ]
