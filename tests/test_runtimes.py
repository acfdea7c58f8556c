"""Speed where it runs (`measure.runtimes`): each runtime's latency logged as its own metric with what ran it, a model
a runtime cannot run recorded as n/a with the reason (the trial still finishes), the report's speed-ups and flags,
the front that stays a front in another runtime, the eager-only default that keeps every cache key, and the refusals
of names that are not runtimes or runtimes this machine lacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pqsweep import identity, latency, pipeline, trial
from pqsweep.reports import report, speedups
from pqsweep.reports.pareto import Objective
from pqsweep.runtimes import EXTRA, NOT_AVAILABLE, p50, p90, tag
from pqsweep.stores import absolute_uri

from nets import compose_cfg, experiment_ids, loader, small_cnn

ALL_BUT_COMPILE = "measure.runtimes=[eager,torchscript,onnxruntime]"  # compile: a slow test of its own


def logged(cfg) -> dict[str, "mlflow.entities.Run"]:
    """The trial's and the baseline's runs of a run's store, by their stage tag."""
    client = MlflowClient(absolute_uri(cfg.tracking.uri))
    return {run.data.tags["stage"]: run for run in client.search_runs(experiment_ids(client))}


# --- measured, logged -------------------------------------------------------------------------------------------

def test_each_runtime_logs_its_latency_and_what_ran_it_for_the_trial_and_the_baseline(make_cfg):
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.5", ALL_BUT_COMPILE)
    returned = trial.run(cfg)

    runs = logged(cfg)
    for stage in ("trial", "baseline"):
        metrics, tags = runs[stage].data.metrics, runs[stage].data.tags
        for runtime in ("torchscript", "onnxruntime"):
            assert 0 < metrics[p50(runtime)] <= metrics[p90(runtime)], (stage, runtime)
        assert p50("compile") not in metrics and tag("compile") not in tags  # not asked for
        assert tags[tag("eager")].startswith("torch ") and tags[tag("torchscript")].startswith("torch ")
        assert tags[tag("onnxruntime")].startswith("onnxruntime ") and "CPUExecutionProvider" in tags[tag("onnxruntime")]
    assert returned[p50("onnxruntime")] == pytest.approx(runs["trial"].data.metrics[p50("onnxruntime")])
    assert runs["trial"].data.metrics["latency_ms_p50"] > 0  # eager keeps its name


def test_a_csr_sparse_model_finishes_without_its_onnxruntime_latency_and_the_report_cell_says_why(make_cfg):
    # 95 % of the cnn's weights pruned: quantization=sparse stores its Linear layers as CSR, which ONNX cannot hold
    cfg = make_cfg("pruning=global_magnitude", "pruning.amount=0.95", "quantization=sparse", ALL_BUT_COMPILE)
    trial.run(cfg)

    runs = logged(cfg)
    point, base = runs["trial"], runs["baseline"]
    assert point.info.status == "FINISHED"
    assert p50("onnxruntime") not in point.data.metrics and p90("onnxruntime") not in point.data.metrics
    assert point.data.tags[tag("onnxruntime")] == NOT_AVAILABLE + "no sparse CSR in ONNX"
    assert point.data.metrics[p50("torchscript")] > 0  # TorchScript keeps the CSR buffer and the sparse matmul
    header, (row,) = speedups.table([("csr", point.data.metrics, point.data.tags)], base.data.metrics, base.data.tags)
    cells = dict(zip(header, row))
    assert cells["onnxruntime x"] == "n/a: no sparse CSR in ONNX"
    assert cells["torchscript x"].endswith("x") and cells["MACs x"] == "1.00x"  # dense MACs: zeros still count


def test_the_baseline_keeps_what_ran_each_runtime_in_its_cache_entry(make_cfg, digits):
    cfg = make_cfg("measure.runtimes=[eager,torchscript]")
    model, loaders, example = small_cnn(), {"test": loader(digits.test)}, digits.test[0][0][None]
    measured, loaded = {}, {}
    first = pipeline.baseline_metrics(cfg, pipeline.stages_of(cfg), model, loaders, example, measured)
    stages = pipeline.stages_of(cfg)
    again = pipeline.baseline_metrics(cfg, stages, model, loaders, example, loaded)
    assert stages.cached["baseline_metrics"] and again == first and p50("torchscript") in again
    assert loaded == measured and loaded[tag("torchscript")].endswith("torch.jit.trace")


def test_a_runtime_whose_outputs_differ_from_eager_is_not_timed():
    model, other = small_cnn(seed=0).eval(), small_cnn(seed=1).eval()
    import torch

    example = torch.randn(1, 1, 8, 8)
    call = lambda x: other(x)  # noqa: E731 - a runtime that computes another model
    with pytest.raises(latency.Unavailable, match="outputs differ from eager"):
        latency._check(model, call, example, example, tolerance=1e-4)
    latency._check(model, model, example, example, tolerance=1e-4)  # the same model passes


@pytest.mark.slow
def test_torch_compile_runs_on_this_cpu_and_says_where_it_fell_back_to_eager():
    import torch

    metrics, tags = latency.measure(small_cnn().eval(), torch.randn(1, 1, 8, 8), ["eager", "compile"], threads=1,
                                    warmup=2, repeats=5)
    assert 0 < metrics[p50("compile")] <= metrics[p90("compile")]
    assert "torch.compile (inductor, CPU)" in tags[tag("compile")]  # a float cnn compiles whole: no graph break


# --- the report -------------------------------------------------------------------------------------------------

def test_flags_tell_a_speedup_that_reverses_from_one_that_vanishes_and_ignore_noise():
    assert speedups.flags(2.0, {"onnxruntime": 0.6}) == ["reverses in ort"]
    assert speedups.flags(0.6, {"onnxruntime": 2.0}) == ["reverses in ort"]  # eager slower, the runtime faster
    assert speedups.flags(2.0, {"torchscript": 1.0, "compile": 1.5}) == ["<=1x in ts"]
    assert speedups.flags(1.02, {"onnxruntime": 0.98}) == ["<=1x in ort"]  # within the p50's noise: no reversal
    assert speedups.flags(2.0, {"onnxruntime": None}) == []  # n/a says so in its own cell


def test_the_report_flags_a_front_point_whose_speedup_reverses_in_another_runtime(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("study")
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": "study"}).info.run_id
    ort = {tag("onnxruntime"): "onnxruntime 1.32.0 CPUExecutionProvider, 1 intra-op thread(s)"}

    def log(tags: dict, **metrics: float) -> None:
        run = client.create_run(experiment, tags={"baseline_hash": "b" * 16, **tags}).info.run_id
        client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run, "FINISHED")

    log({"stage": "baseline", **ort}, top1=95.0, size_mb=1.0, size_gzip_mb=0.9, macs=100.0, latency_ms_p50=1.0,
        latency_ms_p50_onnxruntime=0.5)
    trial_tags = {"stage": "trial", "sweep": "study", "mlflow.parentRunId": parent}
    # faster than the baseline in eager (2x), slower in onnxruntime (0.5 / 0.8 = 0.62x): on the eager front
    log({**trial_tags, "mlflow.runName": "reverses", **ort}, top1=90.0, macs=50.0, latency_ms_p50=0.5,
        latency_ms_p50_onnxruntime=0.8)
    log({**trial_tags, "mlflow.runName": "csr", tag("onnxruntime"): NOT_AVAILABLE + "no sparse CSR in ONNX"},
        top1=80.0, macs=50.0, latency_ms_p50=0.4)
    log({**trial_tags, "mlflow.runName": "keeps", **ort}, top1=94.0, macs=80.0, latency_ms_p50=0.9,
        latency_ms_p50_onnxruntime=0.4)

    report.main(["study", "--uri", uri, "--objectives", "top1:max,latency_ms_p50:min", "--no-plots", "--no-log",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    section = out[out.index("speed where it runs"):]
    rows = {line.split()[0]: line for line in section.splitlines()[5:8]}
    assert "2.00x" in rows["reverses"] and "0.62x" in rows["reverses"] and rows["reverses"].endswith("reverses in ort")
    assert "n/a: no sparse CSR in ONNX" in rows["csr"]
    assert "1.25x" in rows["keeps"] and rows["keeps"].rstrip().endswith("-")  # 0.5 / 0.4: faster in both
    # with onnxruntime's latencies the front of top1 x latency keeps "keeps" alone: "csr" has none, "reverses"
    # is dominated by "keeps"
    assert "onnxruntime 1/3" in section.splitlines()[2]
    assert (tmp_path / "out" / "runtimes-study.md").read_text().count("reverses in ort") == 1


def test_kept_counts_front_points_that_stay_non_dominated_with_another_runtimes_latency():
    objectives = [Objective("top1", "maximize"), Objective("latency_ms_p50", "minimize")]
    rows = [{"top1": 90, "latency_ms_p50": 1.0, p50("onnxruntime"): 1.0},
            {"top1": 80, "latency_ms_p50": 0.5, p50("onnxruntime"): 2.0},  # fast in eager, slow in onnxruntime
            {"top1": 70, "latency_ms_p50": 0.4}]  # onnxruntime could not run it
    assert speedups.kept(rows, objectives, "onnxruntime") == (1, 3)


# --- identity and bad input ---------------------------------------------------------------------------------------

def test_eager_alone_is_the_default_and_keeps_every_stage_key_while_another_runtime_changes_only_the_measured():
    default = identity.stage_keys(compose_cfg())
    assert list(compose_cfg().measure.runtimes) == ["eager"]
    (leaf,) = [leaf for leaf in identity.leaves(compose_cfg()) if leaf.path == ("measure", "runtimes")]
    assert identity.at_default(leaf)  # added=True: at its default it enters no key (tests/data/stage_keys_*.json)
    assert identity.stage_keys(compose_cfg("measure.runtimes=[eager]")) == default
    more = identity.stage_keys(compose_cfg("measure.runtimes=[eager,onnxruntime]"))
    changed = {stage for stage in default if default[stage] != more[stage]}
    assert changed == {"baseline_metrics", "trial", "study"}


def test_a_runtime_whose_package_is_missing_is_refused_before_anything_is_written(tmp_path):
    # onnxruntime made unimportable the way Python knows: None in sys.modules, set by a sitecustomize the CLI loads
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['onnxruntime'] = None\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    script = Path(sys.executable).parent / "pqsweep"
    done = subprocess.run([str(script), "measure.runtimes=[eager,onnxruntime]"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    (error,) = done.stderr.splitlines()
    assert error == ("pqsweep: error: measure.runtimes=['eager', 'onnxruntime'] is not allowed: must be runtimes this "
                     "machine can run (onnxruntime: onnxruntime is not installed (pip install onnxruntime)), or leave "
                     "onnxruntime out")
    assert list(work.iterdir()) == []  # no store, no cache, no outputs


def test_every_runtime_has_its_metrics_described_and_an_objective_direction():
    from pqsweep.metrics import METRICS, OBJECTIVES

    for runtime in EXTRA:
        assert METRICS[p50(runtime)].direction == "minimize" and p50(runtime) in OBJECTIVES
        assert tag(runtime) in METRICS[p50(runtime)].description
