"""pqsweep-report as a person uses it: which sweep it shows, how rows are ordered and aligned, what it says when
there is nothing to show. Then each option and its default, what it prints, writes and logs back, a paper's tables,
the Optuna study and the plots. Each test has an MLflow SQLite store of its own, copied from one made per module
(making one runs MLflow's migrations: seconds)."""

from __future__ import annotations

import csv
import shutil
import time

import mlflow
import optuna
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend

from pqsweep.reports import page, report, table
from pqsweep.reports.sweeps import Sweep


def log_sweep(client, experiment, name, trials, baseline_hashes=("b" * 16,)):
    """A parent run and its trial children; `trials` are (params, metrics) pairs. Returns the parent's id."""
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": name}).info.run_id
    for i, (params, metrics) in enumerate(trials):
        tags = {"stage": "trial", "sweep": name, "mlflow.parentRunId": parent,
                "baseline_hash": baseline_hashes[i % len(baseline_hashes)]}
        run = client.create_run(experiment, tags=tags).info.run_id
        client.log_batch(run, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run, "FINISHED")
    return parent


def point(amount, quantization, bits, top1=90.0):
    params = {"pruning": "global_magnitude", "pruning.amount": amount, "quantization": quantization,
              "quantization.bits": bits}
    return params, {"top1": top1}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables made: making one runs MLflow's migrations (seconds), a copy takes ms."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def client(empty_store, tmp_path):
    """(client, uri) of a store of this test's own, with no experiment but MLflow's Default."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri), uri


def body(out: str) -> list[dict[str, str]]:
    """The printed table's rows as {header: cell}, cut at the widths its dashed line gives (cells may be empty)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("pruning"))
    spans, at = [], 0
    for dashes in lines[start + 1].split("  "):
        spans.append((at, at + len(dashes)))
        at += len(dashes) + 2
    cut = lambda line: [line[a:b].strip() for a, b in spans]  # noqa: E731
    header = cut(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("front of", "  reference")):
            break
        rows.append(dict(zip(header, cut(line))))
    return rows


def test_the_newest_sweep_of_a_name_is_shown(client, capsys):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    log_sweep(client, experiment, "grid", [point("0.5", "none", "32", top1=11.0)])
    time.sleep(0.01)  # start times differ
    newest = log_sweep(client, experiment, "grid", [point("0.5", "none", "32", top1=22.0),
                                                   point("0.9", "none", "32", top1=33.0)])
    log_sweep(client, experiment, "other", [point("0.5", "none", "32", top1=44.0)])
    report.main(["grid", "--uri", uri])
    out = capsys.readouterr().out
    assert f"sweep grid: 2 trials under MLflow run {newest}" in out
    assert [row["top1 %"] for row in body(out)] == ["22.00", "33.00"]


def test_rows_sort_by_amount_then_precision_then_option_name(client, tmp_path):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    points = [point("0.5", "static_int8", "8"), point("0.5", "fp16", "16"), point("0.0", "mixed", "8"),
              point("0.5", "bf16", "16"), point("0.0", "none", "32")]
    log_sweep(client, experiment, "grid", points)
    report.main(["grid", "--uri", uri, "--csv", str(tmp_path / "t.csv")])
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [(r[1], r[2]) for r in rows] == [("0.0", "none"), ("0.0", "mixed"), ("0.5", "bf16"), ("0.5", "fp16"),
                                            ("0.5", "static_int8")]


def test_cells_are_right_aligned_in_columns_as_wide_as_their_widest_entry():
    assert table.render(["a", "bb", "c"], [["ccc", "d", "e"], ["f", "gg", "hhhh"]]) == (
        "  a  bb     c\n"
        "---  --  ----\n"
        "ccc   d     e\n"
        "  f  gg  hhhh")
    assert table.render(["a", "bb"], []) == "a  bb\n-  --"


def test_a_value_a_run_did_not_log_is_a_dash(client, capsys):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    log_sweep(client, experiment, "grid", [point("0.5", "static_int8", "8", top1=9.5)])  # only top1 logged
    report.main(["grid", "--uri", uri])
    (cells,) = body(capsys.readouterr().out)
    assert cells["top1 %"] == "9.50" and cells["status"] == "FINISHED"
    unlogged = ["sparsity", "Δ top1", "size MB", "gzip MB", "sparse MB", "reduction", "gzip red.", "p50 ms"]
    assert [cells[h] for h in unlogged] == ["-"] * len(unlogged)


def test_no_baseline_line_when_the_trials_have_several_baselines(client, capsys):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    log_sweep(client, experiment, "grid", [point("0.0", "none", "32"), point("0.5", "none", "32")],
              baseline_hashes=("a" * 16, "b" * 16))
    for key in ("a" * 16, "b" * 16):
        run = client.create_run(experiment, tags={"stage": "baseline", "baseline_hash": key}).info.run_id
        client.log_batch(run, metrics=[Metric(k, 1.0, 0, 0) for k in ("top1", "size_mb", "size_gzip_mb",
                                                                       "latency_ms_p50")])
    report.main(["grid", "--uri", uri])
    assert "baseline (fp32, dense)" not in capsys.readouterr().out


def test_the_baseline_line_is_the_trials_own_baseline(client, capsys):
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    log_sweep(client, experiment, "grid", [point("0.0", "none", "32")], baseline_hashes=("b" * 16,))
    for key, top1 in (("a" * 16, 11.0), ("b" * 16, 22.0)):
        run = client.create_run(experiment, tags={"stage": "baseline", "baseline_hash": key}).info.run_id
        client.log_batch(run, metrics=[Metric("top1", top1, 0, 0)] + [Metric(k, 1.0, 0, 0) for k in
                                                                        ("size_mb", "size_gzip_mb", "latency_ms_p50")])
    report.main(["grid", "--uri", uri])
    assert "baseline (fp32, dense): top1 22.00%" in capsys.readouterr().out


def test_a_store_without_the_experiment_or_the_sweep_says_so(client):
    client, uri = client
    with pytest.raises(SystemExit, match=r"^pqsweep-report: no sweep 'grid' at sqlite:///.*; sweeps there: none$"):
        report.main(["grid", "--uri", uri])
    with pytest.raises(SystemExit, match=r"^pqsweep-report: no experiment 'mine' at sqlite:///"):
        report.main(["grid", "--uri", uri, "--experiment", "mine"])
    experiment = client.create_experiment("mine")
    log_sweep(client, experiment, "grid", [point("0.0", "none", "32")])
    log_sweep(client, client.create_experiment("other"), "elsewhere", [point("0.0", "none", "32")])
    with pytest.raises(SystemExit, match=r"^pqsweep-report: no sweep 'nope' in experiment 'mine' at sqlite:///"):
        report.main(["nope", "--uri", uri, "--experiment", "mine"])
    report.main(["grid", "--uri", uri, "--experiment", "mine"])  # found where --experiment says
    report.main(["elsewhere", "--uri", uri])  # and, without it, in whichever experiment holds it (each study its own)
    with pytest.raises(SystemExit, match=r"^pqsweep-report: no sweep 'elsewhere' in experiment 'mine' at .*"
                                         r"sweeps there: grid$"):
        report.main(["elsewhere", "--uri", uri, "--experiment", "mine"])


def test_a_missing_store_is_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    # a report only reads: naming a store that is not there must not leave an empty mlflow.db behind
    monkeypatch.chdir(tmp_path)
    for argv in (["foo"], ["--list"], ["foo", "--uri", f"sqlite:///{tmp_path}/elsewhere.db"]):
        with pytest.raises(SystemExit, match=r"^pqsweep-report: --uri=sqlite:///\S+ is not allowed: must be an MLflow "
                                             r"store that exists \(there is no \S+; run the sweep first, or give "
                                             r"--uri sqlite:///<the sweep's mlflow.db>\)$"):
            report.main(argv)
    assert list(tmp_path.iterdir()) == []


def test_the_default_store_is_mlflow_db_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    log_sweep(client, client.create_experiment("pqsweep"), "grid", [point("0.0", "none", "32")])
    mlflow.set_tracking_uri("file:///nowhere")  # main must set the URI itself
    report.main(["grid"])
    assert "sweep grid: 1 trial under" in capsys.readouterr().out


def test_the_swept_keys_are_columns_and_what_only_says_where_or_follows_a_group_is_not(client, capsys):
    # train.finetune_lr was swept (the issue's example of a key the old fixed columns never showed); the runs' ids and
    # the quantization options' own keys differ too, but they say where a trial ran or follow the option's name
    client, uri = client
    experiment = client.create_experiment("pqsweep")
    trials = []
    for i, (lr, quantization) in enumerate([("0.001", "none"), ("0.01", "none"), ("0.001", "static_int8")]):
        params, metrics = point("0.5", quantization, "8" if quantization == "static_int8" else "32", top1=90.0 + i)
        params |= {"train.finetune_lr": lr, "tracking.run_id": f"run{i}", "quantization._target_": f"q.{quantization}"}
        trials.append((params, metrics))
    log_sweep(client, experiment, "grid", trials)
    report.main(["grid", "--uri", uri, "--no-plots", "--no-log"])
    (header, *_) = [list(row) for row in body(capsys.readouterr().out)]
    assert "train.finetune_lr" in header and "quant" in header and "bits" in header
    assert "tracking.run_id" not in header and "quantization._target_" not in header
    assert header.count("quant") == 1  # a swept key that is also a method column appears once


# --- its options ------------------------------------------------------------------------------------------------


OPTIONS = {"sweeps": [], "run": [], "list": False, "uri": "sqlite:///mlflow.db", "experiment": None, "objectives": None,
           "columns": None, "front": False, "budget": [], "csv": None, "markdown": None, "latex": None, "out": None,
           "no_plots": False, "no_log": False, "storage": None, "paper": None,
           "compare": [], "metric": None}


def test_each_option_holds_what_it_was_given_and_defaults_to_nothing_asked():
    assert vars(report.parse(["grid"])) == {**OPTIONS, "sweeps": ["grid"]}
    given = report.parse(["a", "b", "--run", "r1", "--run", "r2", "--list", "--uri", "sqlite:///x.db", "--experiment",
                         "e", "--objectives", "top1:max", "--columns", "top1", "--front", "--budget", "top1>=1",
                         "--budget", "size_mb<=2", "--csv", "t.csv", "--markdown", "t.md", "--latex", "t.tex", "--out",
                         "o", "--no-plots", "--no-log", "--storage", "s.journal", "--paper", "p.csv", "--compare",
                         "train.seed", "--compare", "k=a,b", "--metric", "top5"])
    assert vars(given) == {"sweeps": ["a", "b"], "run": ["r1", "r2"], "list": True, "uri": "sqlite:///x.db",
                           "experiment": "e", "objectives": "top1:max", "columns": "top1", "front": True,
                           "budget": ["top1>=1", "size_mb<=2"], "csv": "t.csv", "markdown": "t.md", "latex": "t.tex",
                           "out": "o", "no_plots": True, "no_log": True, "storage": "s.journal", "paper": "p.csv",
                           "compare": ["train.seed", "k=a,b"], "metric": "top5"}
    assert vars(report.parse(["--run", "r1"])) == {**OPTIONS, "run": ["r1"]}  # a run id alone names a sweep
    assert vars(report.parse(["--list"])) == {**OPTIONS, "list": True}


def test_without_a_sweep_a_run_or_list_it_says_what_to_name(capsys):
    with pytest.raises(SystemExit) as exited:
        report.parse([])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: pqsweep-report ")
    assert err[-1] == "pqsweep-report: error: name a sweep (or --run ID, or --list)"


def test_help_keeps_its_examples_and_output_lines_as_written(capsys):
    with pytest.raises(SystemExit):
        report.parse(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: pqsweep-report ")
    assert f"\n\n{report.__doc__.splitlines()[0]}\n\n" in out
    # RawDescriptionHelpFormatter: the epilog's lines stay lines
    assert "\nexamples:\n  pqsweep-report mnist_cnn_sparsity_x_precision " in out
    assert "\n\noutput: what the trials ran on, the table and front on stdout," in out
    assert out.endswith("under report/. docs/reports.md says more.\n")


# --- a sweep as pqsweep logs one: what the command prints, writes and logs back ---------------------------------


@pytest.fixture
def store(client, tmp_path):
    """(uri, client, experiment id) of a store of this test's own, its artifacts under tmp_path."""
    client, uri = client
    return uri, client, client.create_experiment("pqsweep", artifact_location=(tmp_path / "mlartifacts").as_uri())


# (name, pruning, quantization, status, top1, size_mb): A and B on the front, C dominated, F failed
HAND = [("A", "gm", "none", "FINISHED", 90.0, 0.5), ("B", "gm", "fp16", "FINISHED", 80.0, 0.2),
        ("C", "l1", "none", "FINISHED", 70.0, 0.3), ("F", "gm", "none", "FAILED", 99.0, 0.01)]


def log_hand_sweep(client, experiment, name="hand", trials=HAND, objectives="top1,size_mb", parent_tags=None,
                   baseline=True):
    """A parent run, its trials and their baseline, as a pqsweep sweep logs them: the sweep's objectives, each trial's
    status and Optuna trial number. `trials` are rows like HAND's. Returns (parent id, {name: id})."""
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": name, **(parent_tags or {})}).info.run_id
    if objectives:
        client.log_param(parent, "objectives", objectives)
    ids = {}
    for number, (trial, pruning, quantization, status, top1, size) in enumerate(trials):
        tags = {"stage": "trial", "sweep": name, "mlflow.parentRunId": parent, "baseline_hash": "b",
                "optuna_trial_number": str(number)}
        ids[trial] = client.create_run(experiment, tags=tags).info.run_id
        client.log_batch(ids[trial], params=[Param("pruning", pruning), Param("quantization", quantization)],
                         metrics=[Metric("top1", top1, 0, 0), Metric("top5", top1 + 5, 0, 0),
                                  Metric("size_mb", size, 0, 0), Metric("size_gzip_mb", size / 2, 0, 0)])
        client.set_terminated(ids[trial], status)
    client.set_terminated(parent, "FINISHED")
    if baseline:
        run = client.create_run(experiment, tags={"stage": "baseline", "baseline_hash": "b"}).info.run_id
        client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in
                                       {"top1": 92.0, "top5": 97.0, "size_mb": 1.0, "size_gzip_mb": 0.9,
                                        "latency_ms_p50": 0.1}.items()])
    return parent, ids


def test_list_prints_one_line_per_sweep_and_stops(store, tmp_path, capsys, monkeypatch):
    uri, client, experiment = store
    parent, _ = log_hand_sweep(client, experiment)
    log_hand_sweep(client, client.create_experiment("other"), name="elsewhere", trials=HAND[:1], baseline=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # not where the store is: MLflow's default sqlite:///mlflow.db misses it
    mlflow.set_tracking_uri("sqlite:///nowhere.db")  # main sets the --uri itself
    report.main(["--list", "--uri", uri, "--experiment", "pqsweep"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["sweep", "parent", "run", "status", "finished", "other", "sampler", "started", "(UTC)"]
    assert len(out) == 3 and out[2].split()[:5] == ["hand", parent, "FINISHED", "3", "1"]
    assert list((tmp_path / "cwd").iterdir()) == [] and "pareto" not in client.get_run(parent).data.tags  # it stopped
    report.main(["--list", "--uri", uri])  # every experiment's
    assert sorted(line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]) == ["elsewhere", "hand"]


def test_a_sweep_by_its_run_id_and_a_name_that_has_older_sweeps(store, capsys):
    uri, client, experiment = store
    old, _ = log_hand_sweep(client, experiment, trials=HAND[:1])
    new, _ = log_hand_sweep(client, experiment, trials=HAND[:2])
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log"])
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"sweep hand: 2 trials under MLflow run {new} (FINISHED)",
                       "  ran on: data ?, scale ?, epochs ? baseline + ? fine-tune, seeds ?, weights ?",  # none logged
                       f"  1 older sweep of this name: pqsweep-report --run {old} ..."]
    report.main(["--run", old, "--uri", uri, "--no-plots", "--no-log"])
    assert capsys.readouterr().out.splitlines()[0] == f"sweep hand: 1 trial under MLflow run {old} (FINISHED)"
    newest, _ = log_hand_sweep(client, client.create_experiment("other"), trials=HAND[:3])  # the same name elsewhere
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--experiment", "pqsweep"])
    assert capsys.readouterr().out.splitlines()[0] == f"sweep hand: 2 trials under MLflow run {new} (FINISHED)"
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log"])  # every experiment's: the newest
    assert capsys.readouterr().out.splitlines()[0] == f"sweep hand: 3 trials under MLflow run {newest} (FINISHED)"
    with pytest.raises(SystemExit, match=r"^pqsweep-report: objective 'top1:up'.*direction must be max or min"):
        report.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--objectives", "top1:up"])


def test_what_it_prints_writes_and_says_on_stderr(store, tmp_path, capsys):
    uri, client, experiment = store
    parent, ids = log_hand_sweep(client, experiment)
    out_dir = tmp_path / "out"
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--out", str(out_dir),
                "--columns", " pruning , ,top1,front "])
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0] == f"sweep hand: 4 trials under MLflow run {parent} (FINISHED)"
    assert lines[1].startswith("  ran on: data ?, scale ?")  # what the trials ran on: these hand-made ones log none
    assert lines[2] == "baseline (fp32, dense): top1 92.00%, size 1.0000 MB, gzip 0.9000 MB, p50 0.100 ms"
    # the table in grid order (fp16 before none, then gm before l1), then the front over the sweep's own objectives
    assert lines[3:9] == table.render(["pruning", "top1 %", "front"], [["gm", "80.00", "*"], ["gm", "99.00", ""],
                                      ["gm", "90.00", "*"], ["l1", "70.00", ""]]).splitlines()
    # A's box 20 x 0.5, B's 10 x 0.8, their overlap 10 x 0.5, against (70, 1.0): 13
    assert lines[9:] == ["front of hand over top1 (max), size_mb (min): 2 trials, hypervolume 13",
                         "  reference: top1=70 (worst trial), size_mb=1 (baseline)", f"wrote 3 files under {out_dir}"]
    assert printed.err == "1 trial failed: see its `error` tag in MLflow\n"
    assert sorted(p.name for p in out_dir.iterdir()) == ["table.csv", "table.md", "table.tex"]


def test_without_objectives_of_its_own_the_front_is_over_top1_and_size_and_nothing_failed_is_quiet(store, tmp_path,
                                                                                               capsys):
    uri, client, experiment = store
    log_hand_sweep(client, experiment, trials=HAND[:3], objectives=None, baseline=False)
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log"])
    printed = capsys.readouterr()
    assert "front of hand over top1 (max), size_mb (min): 2 trials, hypervolume " in printed.out
    assert "baseline (fp32" not in printed.out and printed.err == ""
    # no objective to maximise: the plots still show top1, against the first size minimised; no baseline to mark
    out = tmp_path / "out"
    report.main(["hand", "--uri", uri, "--no-log", "--out", str(out), "--objectives", "size_gzip_mb:min,size_mb:min"])
    assert "front of hand over size_gzip_mb (min), size_mb (min): 1 trial" in capsys.readouterr().out
    assert {"top1_vs_size_gzip_mb.png", "report.html"} <= {p.name for p in out.iterdir()}


def test_two_sweeps_each_get_a_front_line_and_one_folder_and_neither_is_logged_to(store, tmp_path, capsys):
    uri, client, experiment = store
    a, a_ids = log_hand_sweep(client, experiment, name="a")
    b, _ = log_hand_sweep(client, experiment, name="b", trials=[("Z", "gm", "none", "FAILED", 1.0, 1.0)])
    report.main(["a", "b", "--uri", uri, "--no-plots"])
    out = capsys.readouterr().out
    assert "front of a over top1 (max), size_mb (min): 2 trials, hypervolume 13\n" in out
    assert "front of b over top1 (max), size_mb (min): 0 trials, hypervolume 0\n" in out  # against a's reference
    assert (tmp_path / "reports" / "a+b" / "table.csv").is_file()  # the default --out
    assert "pareto" not in client.get_run(a_ids["A"]).data.tags and not client.list_artifacts(a)


def test_the_front_only_and_the_tables_written_where_asked(store, tmp_path, capsys):
    uri, client, experiment = store
    log_hand_sweep(client, experiment)
    paths = {ext: tmp_path / f"mine.{ext}" for ext in ("csv", "md", "tex")}
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--front", "--columns", "pruning,quantization,top1",
                "--csv", str(paths["csv"]), "--markdown", str(paths["md"]), "--latex", str(paths["tex"])])
    rows = [["gm", "fp16", "80.00"], ["gm", "none", "90.00"]]  # B and A, the front, in grid order
    header = ["pruning", "quant", "top1 %"]
    assert capsys.readouterr().out.split("\n", 3)[3].startswith(table.render(header, rows) + "\n")  # under 3 lines
    out = tmp_path / "reports" / "hand"
    assert paths["md"].read_text() == (out / "table.md").read_text() == table.markdown(header, rows)
    assert paths["tex"].read_text() == (out / "table.tex").read_text() == table.latex(header, rows)
    with open(paths["csv"], newline="") as f:
        assert list(csv.reader(f)) == [["pruning", "quantization", "top1 (%)"], ["gm", "fp16", "80.0"],
                                       ["gm", "none", "90.0"]]
    assert (out / "table.csv").read_text() == paths["csv"].read_text()


def test_a_budget_prints_each_methods_most_compressed_trial_with_its_run(store, capsys):
    uri, client, experiment = store
    _, ids = log_hand_sweep(client, experiment)
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--columns", "pruning,top1,size_mb,front,status,sweep",
                "--budget", "top1>=75", "--budget", "size_mb<=0.4"])
    out = capsys.readouterr().out.split("budget ", 1)[1].splitlines()
    assert out[0] == ("top1>=75, size_mb<=0.4: per method the most compressed trial (by size_mb) within it, '-' where "
                      "none is; the front above stands beside it")
    # front, status and sweep are the table's own columns, not the budget's
    assert out[1:6] == table.render(["method", "pruning", "top1 %", "size MB", "run"],
                                    [["gm·fp16", "gm", "80.00", "0.2000", ids["B"]],
                                     ["gm·none", "-", "-", "-", "-"],  # A is too big; F failed
                                     ["l1·none", "-", "-", "-", "-"]]).splitlines()  # C is below 75


def test_the_report_is_logged_back_to_the_sweeps_parent_and_its_trials(store, tmp_path, capsys):
    uri, client, experiment = store
    parent, ids = log_hand_sweep(client, experiment)
    report.main(["hand", "--uri", uri, "--no-plots", "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"logged the report to MLflow run {parent} (artifacts report/, trial tags pareto=true|false)")
    tags = client.get_run(parent).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("pareto")} == {
        "pareto_objectives": "top1:max,size_mb:min", "pareto_front_size": "2", "pareto_hypervolume": "13",
        "pareto_reference": "reference: top1=70 (worst trial), size_mb=1 (baseline)"}
    assert {n: client.get_run(i).data.tags["pareto"] for n, i in ids.items()} == {
        "A": "true", "B": "true", "C": "false", "F": "false"}
    assert {a.path for a in client.list_artifacts(parent, "report")} == {"report/table.csv", "report/table.md",
                                                                        "report/table.tex"}


def test_a_sweep_without_a_hypervolume_logs_none(store, capsys):
    uri, client, experiment = store
    parent, ids = log_hand_sweep(client, experiment, trials=[("F", "gm", "none", "FAILED", 1.0, 1.0)])
    report.main(["hand", "--uri", uri, "--no-plots"])
    assert "front of hand over top1 (max), size_mb (min): 0 trials, no hypervolume\n" in capsys.readouterr().out
    tags = client.get_run(parent).data.tags
    assert tags["pareto_front_size"] == "0" and "pareto_hypervolume" not in tags
    assert tags["pareto_reference"] == "no finished trial has every objective"
    assert client.get_run(ids["F"]).data.tags["pareto"] == "false"


def log_fake_data_sweep(client, experiment, test_images):
    """Two trials on random images of 1000 classes as a real trial logs its data (params and inputs): top-5 0 % and
    3.85 % (one hit in 26 images), the cpu scale of resnet18_imagenet_ptq_then_prune."""
    from nets import compose_cfg

    from pqsweep import records

    cfg = compose_cfg("sweep=resnet18_imagenet_ptq_then_prune")
    data = {"train": 92, "val": 10, "test": test_images, "image_size": 224, "in_channels": 3, "num_classes": 1000}
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": "fake"}).info.run_id
    client.log_param(parent, "objectives", "top5,size_mb")
    for top5, size in ((0.0, 11.8), (3.85, 46.8)):
        run = client.create_run(experiment, tags={"stage": "trial", "sweep": "fake", "mlflow.parentRunId": parent})
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in records.params(cfg).items()],
                         metrics=[Metric("top5", top5, 0, 0), Metric("size_mb", size, 0, 0)])
        with mlflow.start_run(run_id=run.info.run_id):
            records.log_inputs(cfg, data)
        client.set_terminated(run.info.run_id, "FINISHED")


def test_a_front_at_chance_says_so_instead_of_a_hypervolume(store, capsys):
    uri, client, experiment = store
    log_fake_data_sweep(client, experiment, test_images=26)
    report.main(["fake", "--uri", uri, "--no-plots", "--no-log"])
    out = capsys.readouterr().out
    assert "  ran on: data fake (train 92 / val 10 / test 26 images, 1000 classes, random images (fake data): " \
           "accuracy is chance), scale cpu, epochs 0 baseline + 0 fine-tune, seeds 0, weights random init, untrained\n" in out
    assert ("front of fake over top5 (max), size_mb (min): 2 trials, no hypervolume: every front trial's top5 is "
            "chance (0.5 % for 1000 classes, within 3 standard errors over 26 test images), so the front trades "
            "nothing\n") in out


def test_the_same_accuracy_over_many_test_images_is_no_longer_chance(store, capsys):
    uri, client, experiment = store
    log_fake_data_sweep(client, experiment, test_images=10000)  # 3.85 % is 16 standard errors above 0.5 % here
    report.main(["fake", "--uri", uri, "--no-plots", "--no-log"])
    assert "front of fake over top5 (max), size_mb (min): 2 trials, hypervolume " in capsys.readouterr().out


# --- a paper's tables -------------------------------------------------------------------------------------------


PAPER_CSV = ("source,table,row,column,value,unit,match,metric,factor\n"
             "p.txt,Table I,dense,Top-1 (%),91.5,%,quantization=none,top1,1\n"
             "p.txt,Table I,half,Top-1 (%),79.0,%,quantization=fp16,top1,\n")


def test_a_papers_tables_are_printed_and_written_beside_ours(store, tmp_path, capsys):
    uri, client, experiment = store
    log_hand_sweep(client, experiment, trials=HAND[:2])
    paper = tmp_path / "p.paper.csv"
    paper.write_text(PAPER_CSV)
    out = tmp_path / "out"
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--out", str(out), "--paper", str(paper)])
    header = ["row", "Top-1 (%) ours", "Top-1 (%) paper", "Top-1 (%) Δ"]
    rows = [["dense", "90.0", "91.5", "-1.5"], ["half", "80.0", "79.0", "+1.0"]]
    printed = capsys.readouterr().out
    assert ("p.txt, Table I: ours (mean ± sd over seeds where several), the paper's value, ours - paper\n"
            + table.render(header, rows) + "\n") in printed
    assert f"wrote 6 files under {out}\n" in printed
    with open(out / "paper-table_i.csv", newline="") as f:
        assert list(csv.reader(f)) == [header, *rows]
    assert (out / "paper-table_i.md").read_text() == "p.txt, Table I\n\n" + table.markdown(header, rows)
    assert (out / "paper-table_i.tex").read_text() == table.latex(header, rows)
    with pytest.raises(SystemExit, match=f"^pqsweep-report: --paper {tmp_path / 'none.csv'}: no such file$"):
        report.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--paper", str(tmp_path / "none.csv")])


# --- the Optuna study and the plots -----------------------------------------------------------------------------


def journal_study(tmp_path, name="hand", values=((90.0, 0.5), (80.0, 0.2), (70.0, 0.3))):
    """An Optuna study in a journal file, as `pqsweep -m` keeps one: its trials' numbers are the runs' tags."""
    url = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name=name, directions=["maximize", "minimize"],
                                storage=optuna.storages.JournalStorage(JournalFileBackend(url)))
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v)))
    return url


def test_the_optuna_study_a_parent_names_is_opened_unless_it_cannot_be(store, tmp_path):
    _, client, experiment = store
    url = journal_study(tmp_path)

    def parent(**tags):
        return Sweep("s", client.get_run(client.create_run(experiment, tags=tags).info.run_id), [], None)

    assert report.optuna_study(parent(), None) == (None, "not an Optuna study")
    assert report.optuna_study(parent(optuna_study="hand"), None) == (None, "not an Optuna study")
    assert report.optuna_study(parent(optuna_storage=url), None) == (None, "not an Optuna study")
    study, why = report.optuna_study(parent(optuna_study="hand", optuna_storage=url), None)
    assert (study.study_name, len(study.trials), why) == ("hand", 3, "")
    masked = "postgresql+psycopg://me:***@db/optuna"
    assert report.optuna_study(parent(optuna_study="hand", optuna_storage=masked), None) == (
        None, f"its storage's password is masked ({masked}): give --storage")
    study, why = report.optuna_study(parent(optuna_study="hand", optuna_storage=masked), url)  # --storage wins
    assert study.study_name == "hand" and why == ""
    study, why = report.optuna_study(parent(optuna_study="nope", optuna_storage=url), None)
    assert study is None and why.startswith(f"cannot open study nope at {url}: KeyError: ")


def test_optunas_agreement_is_printed_where_the_front_is_over_the_studys_own_objectives(store, tmp_path, capsys):
    uri, client, experiment = store
    url = journal_study(tmp_path)
    log_hand_sweep(client, experiment, trials=HAND[:3], parent_tags={"optuna_study": "hand", "optuna_storage": url})
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log"])
    assert "Optuna's best_trials are this front (2 trials)\n" in capsys.readouterr().out
    report.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--objectives", "top1:max,size_gzip_mb:min"])
    assert "Optuna's best_trials" not in capsys.readouterr().out


def figure(path, name):
    """(traces, layout) of a plotly figure the report's page holds, as JSON."""
    from pqsweep.reports import page

    found = page.figures(path)[name]
    return found["data"], found["layout"]


def test_the_plots_are_of_the_maximised_objective_against_the_most_compressed_and_optunas_views(store, tmp_path,
                                                                                                 capsys):
    uri, client, experiment = store
    url = journal_study(tmp_path)
    log_hand_sweep(client, experiment, trials=HAND[:3], parent_tags={"optuna_study": "hand", "optuna_storage": url})
    out = tmp_path / "out"
    report.main(["hand", "--uri", uri, "--no-log", "--out", str(out), "--objectives", "size_gzip_mb:min,top5:max"])
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"table.csv", "table.md", "table.tex", "top5_vs_size_gzip_mb.png", "report.html"}
    assert sum(p.stat().st_size for p in out.rglob("*")) < 6e6  # one plotly.js (4.8 MB); per-plot pages weighed 14 MB
    assert f"wrote {len(files)} files under {out}\n" in capsys.readouterr().out
    # one page: the front and Optuna's views of the study, under the report's header
    assert list(page.figures(out / "report.html")) == ["top5_vs_size_gzip_mb", "optuna_pareto_front",
                                                       "optuna_hypervolume_history"]
    assert "front of hand over size_gzip_mb (min), top5 (max)" in (out / "report.html").read_text()
    traces, layout = figure(out / "report.html", "top5_vs_size_gzip_mb")  # each trial at its own point, and the baseline
    points = [(t["meta"]["sweep"], x, y) for t in traces if t["meta"]["kind"] == "points" for x, y in zip(t["x"], t["y"])]
    assert sorted(points) == [("hand", 0.1, 85.0), ("hand", 0.15, 75.0), ("hand", 0.25, 95.0)]
    assert [(t["x"], t["y"]) for t in traces if t["meta"]["kind"] == "baseline"] == [([0.9], [97.0])]
    assert layout["title"]["text"] == "top5 vs size_gzip_mb — hand"
