"""Seeds as an axis: a grid run at n seeds (each seed's own baseline, shared across its points), the report's cells
as mean ± 95 % CI over seeds, and a paired comparison of two options of a factor that says whether the difference
is real. The statistics are checked against values worked by hand on a real MLflow store; one real subprocess sweep
runs study.seeds=2 end to end."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pqsweep.reports import report, seeds
from pqsweep.reports.sweeps import load
from pqsweep.reports.table import Row

from nets import experiment_ids
from test_report_cli import log_sweep


def test_the_interval_is_students_t_over_the_values():
    i = seeds.interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.302653: half-width 4.302653 / sqrt(3)
    assert i.mean == 2.0 and i.n == 3 and i.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(seeds.interval([5.0]).half) and not seeds.interval([5.0]).excludes_zero()
    assert seeds.interval([0.9, 1.0, 1.1]).excludes_zero() and not seeds.interval([-1.0, 1.0, 0.5]).excludes_zero()


# Two options of a factor at two amounts, three seeds. At 0.5 option "b" gains 1.0, 1.2, 0.8 over "a" on the same
# seed (a real gain, though the seeds spread "a" by 10 pp); at 0.9 it gains +2, -2, +0.3: inside the noise.
A = {("0.5", "0"): 80.0, ("0.5", "1"): 90.0, ("0.5", "2"): 70.0, ("0.9", "0"): 60.0, ("0.9", "1"): 50.0,
     ("0.9", "2"): 55.0}
GAIN = {("0.5", "0"): 1.0, ("0.5", "1"): 1.2, ("0.5", "2"): 0.8, ("0.9", "0"): 2.0, ("0.9", "1"): -2.0,
        ("0.9", "2"): 0.3}


@pytest.fixture
def seeded_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("k")
    trials = []
    for (amount, seed), top1 in A.items():
        for option, value in (("a", top1), ("b", top1 + GAIN[(amount, seed)])):
            params = {"pruning.amount": amount, "train.seed": seed, "recipe": option}
            trials.append((params, {"top1": value, "size_mb": 1.0}))
    log_sweep(client, experiment, "k", trials)
    sweep = load(client, None, name="k")
    rows = [Row(sweep, run, False) for run in sweep.trials]
    return rows, ["train.seed", "pruning.amount", "recipe"], uri


def test_each_point_is_shown_as_mean_and_ci_over_its_seeds(seeded_sweep):
    rows, swept, _ = seeded_sweep
    assert seeds.seeded(rows)
    header, body = seeds.summary(rows, swept, ["top1"])
    assert header == ["pruning.amount", "recipe", "top1 %"]
    by_point = {(r[0], r[1]): r[2] for r in body}
    half = 4.302653 * 10.0 / math.sqrt(3)  # a at 0.5: 80, 90, 70: sd 10
    assert by_point[("0.5", "a")] == f"80.00 ± {half:.2f} (n=3)"


def test_a_paired_comparison_finds_the_real_gain_and_calls_the_other_noise(seeded_sweep):
    rows, swept, _ = seeded_sweep
    header, body = seeds.compare(rows, swept, "recipe", "top1")
    assert header == ["pruning.amount", "compared", "Δ top1", "95 % CI", "seeds", "verdict"]
    lines = {r[0]: r for r in body}
    half = 4.302653 * 0.2 / math.sqrt(3)  # 1.0, 1.2, 0.8: sd 0.2
    assert lines["0.5"][1:] == ["b − a", "+1.00", f"[+{1 - half:.2f}, +{1 + half:.2f}]", "3", "real"]
    assert lines["0.9"][2] == "+0.10" and lines["0.9"][5] == "inside the noise"
    # over both points: each seed's mean gain (1.5, -0.4, 0.55), a CI over the 3 seeds
    assert lines["all points"][2] == "+0.55" and lines["all points"][4] == "3"
    assert lines["all points"][5] == "inside the noise"


def test_a_comparison_names_what_it_cannot_compare(seeded_sweep):
    rows, swept, _ = seeded_sweep
    with pytest.raises(ValueError, match=r"^--compare recipe=a,c: the trials have recipe in a, b"):
        seeds.compare(rows, swept, "recipe", "top1", ["a", "c"])
    with pytest.raises(ValueError, match=r"^--compare nope: no trial has that param"):
        seeds.compare(rows, swept, "nope", "top1")


def test_the_report_prints_and_writes_the_seed_tables(seeded_sweep, tmp_path, capsys):
    _, _, uri = seeded_sweep
    report.main(["k", "--uri", uri, "--no-plots", "--no-log", "--out", str(tmp_path / "out"), "--objectives",
                 "top1:max,size_mb:min", "--compare", "recipe"])
    out = capsys.readouterr().out
    assert "over seeds: mean ± 95 % CI" in out and "recipe: top1 paired by seed, each option against a" in out
    assert (tmp_path / "out" / "seeds.md").is_file() and "real" in (tmp_path / "out" / "compare-1.md").read_text()
    with pytest.raises(SystemExit, match="no trial has that param"):
        report.main(["k", "--uri", uri, "--no-plots", "--no-log", "--out", str(tmp_path / "o2"), "--compare", "x"])


@pytest.mark.slow
def test_study_seeds_runs_every_point_at_each_seed_with_one_baseline_per_seed(tmp_path):
    command = [sys.executable, "-m", "pqsweep.cli", "-m", "dataset=digits", "dataset.num_samples=400",
               "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=1", "measure.repeats=3",
               "pruning=global_magnitude", "pruning.amount=0.5,0.8", "train.distill.enabled=false,true",
               "study.seeds=2", "train.seed=5", "study.name=seeded", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
               f"cache.dir={tmp_path}/cache"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    trials = client.search_runs(experiment_ids(client), "tags.stage = 'trial'")
    assert len(trials) == 8 and {t.info.status for t in trials} == {"FINISHED"}
    by_seed = {}
    for t in trials:
        by_seed.setdefault(t.data.params["train.seed"], set()).add(t.data.tags["baseline_hash"])
    assert sorted(by_seed) == ["5", "6"] and all(len(h) == 1 for h in by_seed.values())  # one baseline per seed
    assert by_seed["5"] != by_seed["6"]
    shown = subprocess.run([sys.executable, "-m", "pqsweep.reports.report", "seeded", "--uri",
                            f"sqlite:///{tmp_path}/mlflow.db", "--no-plots", "--no-log", "--compare",
                            "train.distill.enabled"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "(n=2)" in shown.stdout and "True − False" in shown.stdout
