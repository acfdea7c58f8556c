"""What the report's own tests left open (found by mutation testing), on runs built in memory: the LaTeX and markdown
text to the character, which column a name becomes, the default columns' order, grid order for keys that are not
numbers, the method label, what "most compressed" means, Optuna's agreement line and the CSV's empty and 1 / 0 cells.
Then the command itself: each option, what it prints, writes and logs back, a paper's tables, the Optuna study and the
plots, on a real MLflow SQLite store per test (copied from one made per module: making one takes seconds)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from types import SimpleNamespace

import mlflow
import optuna
import pytest
from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend

from pqsweep.reports import table
from pqsweep.reports.pareto import Objective
from pqsweep.reports.sweeps import Sweep

TOP1, SIZE = Objective("top1", "maximize"), Objective("size_mb", "minimize")


def run(run_id: str = "r", status: str = "FINISHED", params=None, metrics=None, tags=None) -> Run:
    info = RunInfo(run_id=run_id, experiment_id="0", user_id="u", status=status, start_time=0, end_time=None,
                   lifecycle_stage="active")
    data = RunData(metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()],
                   params=[Param(k, str(v)) for k, v in (params or {}).items()],
                   tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    return Run(info, data)


def sweep(name: str, trials: list[Run], parent_params=None, baseline: Run | None = None) -> Sweep:
    return Sweep(name, run(f"{name}-parent", params=parent_params), trials, baseline)


# --- the tables' text -------------------------------------------------------------------------------------------

def test_latex_escapes_what_tex_would_read_as_markup():
    text = table.latex(["Δ top1", "a_b", "x & y"], [["50%", "#1", "a\\b"], ["·", "-", "1.00"]])
    assert text == ("\\begin{tabular}{lll}\n"
                    "\\toprule\n"
                    "$\\Delta$ top1 & a\\_b & x \\& y \\\\\n"
                    "\\midrule\n"
                    "50\\% & \\#1 & a\\textbackslash{}b \\\\\n"
                    "$\\cdot$ & - & 1.00 \\\\\n"
                    "\\bottomrule\n"
                    "\\end{tabular}\n")


def test_markdown_is_a_header_a_rule_and_one_line_per_row():
    assert table.markdown(["a", "bb"], [["1", "2"], ["3", "4"]]) == "| a | bb |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n"


def test_a_header_wider_than_every_cell_sets_its_columns_width():
    assert table.render(["long", "x"], [["1", "22"], ["3", "4"]]) == "long   x\n----  --\n   1  22\n   3   4"
    assert table.render(["long"], [["1"]]) == "long\n----\n   1"


# --- which column a name becomes --------------------------------------------------------------------------------

def test_a_name_is_a_metric_where_a_run_logged_it_or_the_table_knows_it_else_a_param():
    runs = [run(params={"pruning": "gm", "lr": "0.1"}, metrics={"mine": 1.0})]
    assert table.column("mine", runs) == table.Column("mine", "metrics", "mine", "", "{:.4g}")
    assert table.column("top5", runs) == table.Column("top5", "metrics", "top5 %", "%", "{:.2f}")  # known, unlogged
    assert table.column("pruning", runs) == table.Column("pruning", "params", "pruning")
    assert table.column("lr", runs) == table.Column("lr", "params", "lr")


def test_a_prefix_says_where_a_name_comes_from():
    runs = [run(params={"top1": "p"}, metrics={"top1": 1.0}, tags={"top1": "t"})]
    assert table.column("params.top1", runs) == table.Column("top1", "params", "top1")
    assert table.column("tags.top1", runs) == table.Column("top1", "tags", "top1")
    assert table.column("metrics.size_mb", runs) == table.Column("size_mb", "metrics", "size MB", "MB", "{:.4f}")
    assert table.column("params.quantization", runs).header == "quant"
    assert table.column("tags.quantization", runs).header == "quantization"  # params' short headers are theirs
    assert table.column("params.train.lr", runs) == table.Column("train.lr", "params", "train.lr")  # first dot only
    assert table.column("status", runs) == table.Column("status", "info", "status")
    assert table.column("front", runs) == table.Column("front", "front", "front")
    assert table.column("sweep", runs) == table.Column("sweep", "sweep", "sweep")


def test_cells_of_every_kind():
    trial = run(status="FAILED", params={"pruning": "gm"}, metrics={"top1": 91.234, "size_mb": math.nan},
                tags={"error": "boom"})
    row = table.Row(sweep("grid", [trial]), trial, front=True)
    runs = [trial]
    cells = {key: table.shown(row, table.column(key, runs))
             for key in ("pruning", "top1", "size_mb", "tags.error", "status", "front", "sweep", "top5")}
    assert cells == {"pruning": "gm", "top1": "91.23", "size_mb": "-", "tags.error": "boom", "status": "FAILED",
                     "front": "*", "sweep": "grid", "top5": "-"}
    assert table.shown(table.Row(row.sweep, trial, front=False), table.column("front", runs)) == ""


def test_default_columns_methods_then_swept_then_standard_then_objectives_front_and_status():
    a = sweep("a", [run(params={"pruning": "gm", "train.lr": "0.1"}), run(params={"pruning": "gm", "train.lr": "1"})])
    keys = table.default_columns([a], [TOP1, Objective("macs", "minimize")])
    assert keys == ["pruning", "train.lr", *table.STANDARD, "macs", "front", "status"]
    b = sweep("b", [run(params={"quantization": "fp16"})])
    assert table.default_columns([a, b], [TOP1])[:4] == ["sweep", "pruning", "quantization", "train.lr"]


# --- grid order and the method label ----------------------------------------------------------------------------

def test_swept_keys_that_are_not_numbers_sort_after_numbers_by_their_text():
    def row(**params):
        return table.Row(sweep("s", []), run(params=params), False)

    rows = [row(lr="b"), row(lr="10"), row(lr="a"), row(lr="9"), row()]
    ordered = sorted(rows, key=lambda r: table.order(r, ["lr"]))
    assert [r.run.data.params.get("lr") for r in ordered] == ["9", "10", None, "a", "b"]  # 9 before 10: numbers
    # unlogged amount and bits read as dense (0.0) and full precision (32)
    dense = row(**{"pruning.amount": "0.0", "quantization.bits": "32", "quantization": "none"})
    assert table.order(row(quantization="none"), []) == table.order(dense, [])
    assert table.order(row(), [])[3] == ""


def test_grid_order_is_amount_up_then_bits_down_then_the_option_name():
    def row(amount, bits, quantization):
        params = {"pruning.amount": amount, "quantization.bits": bits, "quantization": quantization}
        return table.Row(sweep("s", []), run(params=params), False)

    rows = [row("10", "8", "b"), row("9", "8", "b"), row("9", "16", "b"), row("9", "8", "a")]
    ordered = sorted(rows, key=lambda r: table.order(r, []))
    assert [tuple(r.run.data.params.values()) for r in ordered] == [
        ("9", "16", "b"), ("9", "8", "a"), ("9", "8", "b"), ("10", "8", "b")]


def test_the_method_label_names_the_bits_only_where_the_sweep_varies_them():
    trials = [run(params={"pruning": "gm", "quantization": "mixed", "quantization.bits": b}) for b in ("4", "8")]
    varied = sweep("v", trials)
    assert [table.method(t, varied) for t in trials] == ["gm·mixed4", "gm·mixed8"]
    assert table.method(trials[0], sweep("fixed", trials[:1])) == "gm·mixed"
    assert table.method(run(params={"quantization.bits": "None"}), varied) == "?·?"
    point = table.point(run("id1", metrics={"top1": 1.5, "size_mb": math.nan}), varied)
    assert point == {"top1": 1.5, "size_mb": None, "method": "?·?", "status": "FINISHED", "run_id": "id1"}


def test_most_compressed_is_the_first_minimised_size_else_the_first_minimised_objective():
    latency, gzip = Objective("latency_ms_p50", "minimize"), Objective("size_gzip_mb", "minimize")
    assert table.compressed_by([TOP1, latency, gzip, SIZE]) == gzip
    assert table.compressed_by([TOP1, Objective("size_x", "maximize"), latency]) == latency
    assert table.compressed_by([TOP1]) == SIZE


# --- fronts, budgets, Optuna ------------------------------------------------------------------------------------

def test_only_a_finished_trial_with_every_objective_has_values():
    assert table.values(run(metrics={"top1": 1.0, "size_mb": 2.0}), [TOP1, SIZE]) == [1.0, 2.0]
    assert table.values(run(metrics={"top1": 1.0}), [TOP1, SIZE]) is None
    assert table.values(run(status="RUNNING", metrics={"top1": 1.0, "size_mb": 2.0}), [TOP1, SIZE]) is None


def test_several_sweeps_share_a_baseline_reference_only_when_they_have_the_same_baseline():
    base = run("base", metrics={"top1": 99.0, "size_mb": 4.0})
    ta, tb, tc = (run(n, metrics={"top1": t, "size_mb": m}) for n, t, m in (("a", 90.0, 1.0), ("b", 80.0, 0.5),
                                                                         ("c", 85.0, 2.0)))
    a, b = sweep("a", [ta], baseline=base), sweep("b", [tb, tc], baseline=base)
    rows = [table.Row(a, ta, True), table.Row(b, tb, True), table.Row(b, tc, True)]
    # each sweep's own front against (80, 4): a's box 10 x 3; b's c 5 x 2 (b itself sits on top1's reference)
    volumes, described = table.hypervolumes([a, b], rows, [TOP1, SIZE])
    assert volumes == {"a": 30.0, "b": 10.0}
    assert described == "reference: top1=80 (worst trial), size_mb=4 (baseline)"
    b.baseline = run("other", metrics={"top1": 99.0, "size_mb": 8.0})  # two baselines: the trials' worst, size 2
    assert table.hypervolumes([a, b], rows, [TOP1, SIZE]) == (
        {"a": 10.0, "b": 0.0}, "reference: top1=80 (worst trial), size_mb=2 (worst trial)")
    assert table.hypervolumes([a], [table.Row(a, run(), True)], [TOP1, SIZE]) == (
        {}, "no finished trial has every objective")


def test_a_sweep_without_a_baseline_takes_its_reference_from_the_trials():
    trials = [run("t", metrics={"top1": 90.0, "size_mb": 1.0}), run("u", metrics={"top1": 80.0, "size_mb": 0.5}),
              run("w", metrics={"top1": 70.0, "size_mb": 2.0})]
    s = sweep("s", trials)
    volumes, described = table.hypervolumes([s], [table.Row(s, t, t.info.run_id != "w") for t in trials], [TOP1, SIZE])
    # against (70, 2): t's box 20 x 1, u's 10 x 1.5, their overlap 10 x 1
    assert volumes == {"s": 25.0} and described == "reference: top1=70 (worst trial), size_mb=2 (worst trial)"


def test_a_budget_over_several_sweeps_names_each_method_with_its_sweep():
    trials = [run("x", params={"pruning": "gm", "quantization": "none"}, metrics={"top1": 90.0, "size_mb": 1.0}),
              run("y", status="FAILED", params={"pruning": "gm", "quantization": "none"},
                  metrics={"top1": 95.0, "size_mb": 0.5})]
    a, b = sweep("a", trials[:1]), sweep("b", trials[1:])
    rows = [table.Row(a, trials[0], True), table.Row(b, trials[1], False)]
    by, chosen = table.within_budget(rows, [], [TOP1, SIZE])
    assert by == "size_mb" and chosen == {"a: gm·none": rows[0], "b: gm·none": None}  # a failed trial is never chosen
    assert table.within_budget(rows[:1], [], [TOP1, SIZE])[1] == {"gm·none": rows[0]}


def test_agreement_with_optunas_best_trials_names_the_trials_either_side_lacks():
    trials = [run(str(n), tags={"optuna_trial_number": str(n)}) for n in range(3)]
    s = sweep("s", trials)
    rows = [table.Row(s, trials[0], True), table.Row(s, trials[1], True), table.Row(s, trials[2], False)]

    def study(*numbers, discarded=()):
        return SimpleNamespace(best_trials=[SimpleNamespace(number=n, user_attrs={"pqsweep.discarded": n in discarded})
                                            for n in numbers])

    assert table.agreement(study(0, 1), rows, s) == "Optuna's best_trials are this front (2 trials)"
    assert table.agreement(study(0, 1, 2, discarded=(2,)), rows, s) == "Optuna's best_trials are this front (2 trials)"
    assert table.agreement(study(1, 2), rows, s) == ("Optuna's best_trials differ from this front: only Optuna [2], "
                                                      "only here [0]")


def test_the_csv_holds_numbers_an_empty_cell_for_a_missing_one_and_the_front_as_1_or_0(tmp_path):
    trials = [run("a", params={"pruning": "gm"}, metrics={"top1": 90.5}), run("b", params={"pruning": "gm"})]
    s = sweep("s", trials)
    columns = [table.column(k, trials) for k in ("pruning", "top1", "front")]
    table.write_csv(tmp_path / "t.csv", columns, [table.Row(s, trials[0], True), table.Row(s, trials[1], False)])
    with open(tmp_path / "t.csv", newline="") as f:
        assert list(csv.reader(f)) == [["pruning", "top1 (%)", "front"], ["gm", "90.5", "1"], ["gm", "", "0"]]


# --- the command: options, what it prints, writes and logs back (a real MLflow SQLite store per test) -----------

OPTIONS = {"sweeps": [], "run": [], "list": False, "uri": "sqlite:///mlflow.db", "experiment": None, "objectives": None,
           "columns": None, "front": False, "budget": [], "csv": None, "markdown": None, "latex": None, "out": None,
           "no_plots": False, "no_log": False, "storage": None, "paper": None}


def test_each_option_holds_what_it_was_given_and_defaults_to_nothing_asked():
    assert vars(table.parse(["grid"])) == {**OPTIONS, "sweeps": ["grid"]}
    given = table.parse(["a", "b", "--run", "r1", "--run", "r2", "--list", "--uri", "sqlite:///x.db", "--experiment",
                         "e", "--objectives", "top1:max", "--columns", "top1", "--front", "--budget", "top1>=1",
                         "--budget", "size_mb<=2", "--csv", "t.csv", "--markdown", "t.md", "--latex", "t.tex", "--out",
                         "o", "--no-plots", "--no-log", "--storage", "s.journal", "--paper", "p.csv"])
    assert vars(given) == {"sweeps": ["a", "b"], "run": ["r1", "r2"], "list": True, "uri": "sqlite:///x.db",
                           "experiment": "e", "objectives": "top1:max", "columns": "top1", "front": True,
                           "budget": ["top1>=1", "size_mb<=2"], "csv": "t.csv", "markdown": "t.md", "latex": "t.tex",
                           "out": "o", "no_plots": True, "no_log": True, "storage": "s.journal", "paper": "p.csv"}
    assert vars(table.parse(["--run", "r1"])) == {**OPTIONS, "run": ["r1"]}  # a run id alone names a sweep
    assert vars(table.parse(["--list"])) == {**OPTIONS, "list": True}


def test_without_a_sweep_a_run_or_list_it_says_what_to_name(capsys):
    with pytest.raises(SystemExit) as exited:
        table.parse([])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: pqsweep-report ")
    assert err[-1] == "pqsweep-report: error: name a sweep (or --run ID, or --list)"


def test_help_keeps_its_examples_and_output_lines_as_written(capsys):
    with pytest.raises(SystemExit):
        table.parse(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: pqsweep-report ")
    assert f"\n\n{table.__doc__.splitlines()[0]}\n\n" in out
    # RawDescriptionHelpFormatter: the epilog's lines stay lines
    assert "\nexamples:\n  pqsweep-report mnist_cnn_sparsity_x_precision " in out
    assert "\n\noutput: the table and front on stdout," in out and out.endswith("run under report/.\n")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables made: making one runs MLflow's migrations (seconds), a copy takes ms."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_store, tmp_path):
    """(uri, client, experiment id) of a store of this test's own, its artifacts under tmp_path."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("pqsweep", artifact_location=(tmp_path / "mlartifacts").as_uri())


# (name, pruning, quantization, status, top1, size_mb): A and B on the front, C dominated, F failed
HAND = [("A", "gm", "none", "FINISHED", 90.0, 0.5), ("B", "gm", "fp16", "FINISHED", 80.0, 0.2),
        ("C", "l1", "none", "FINISHED", 70.0, 0.3), ("F", "gm", "none", "FAILED", 99.0, 0.01)]


def log_sweep(client, experiment, name="hand", trials=HAND, objectives="top1,size_mb", parent_tags=None,
              baseline=True):
    """A parent run, its trials and their baseline, as a pqsweep sweep logs them. Returns (parent id, {name: id})."""
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
    parent, _ = log_sweep(client, experiment)
    log_sweep(client, client.create_experiment("other"), name="elsewhere", trials=HAND[:1], baseline=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # not where the store is: MLflow's default sqlite:///mlflow.db misses it
    mlflow.set_tracking_uri("sqlite:///nowhere.db")  # main sets the --uri itself
    table.main(["--list", "--uri", uri, "--experiment", "pqsweep"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["sweep", "parent", "run", "status", "finished", "other", "sampler", "started", "(UTC)"]
    assert len(out) == 3 and out[2].split()[:5] == ["hand", parent, "FINISHED", "3", "1"]
    assert list((tmp_path / "cwd").iterdir()) == [] and "pareto" not in client.get_run(parent).data.tags  # it stopped
    table.main(["--list", "--uri", uri])  # every experiment's
    assert sorted(line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]) == ["elsewhere", "hand"]


def test_a_sweep_by_its_run_id_and_a_name_that_has_older_sweeps(store, capsys):
    uri, client, experiment = store
    old, _ = log_sweep(client, experiment, trials=HAND[:1])
    new, _ = log_sweep(client, experiment, trials=HAND[:2])
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log"])
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"sweep hand: 2 trials under MLflow run {new} (FINISHED)",
                       f"  1 older sweep(s) of this name: pqsweep-report --run {old} ..."]
    table.main(["--run", old, "--uri", uri, "--no-plots", "--no-log"])
    assert capsys.readouterr().out.splitlines()[0] == f"sweep hand: 1 trials under MLflow run {old} (FINISHED)"
    newest, _ = log_sweep(client, client.create_experiment("other"), trials=HAND[:3])  # the same name elsewhere
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--experiment", "pqsweep"])
    assert capsys.readouterr().out.splitlines()[0] == f"sweep hand: 2 trials under MLflow run {new} (FINISHED)"
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log"])  # every experiment's: the newest
    assert capsys.readouterr().out.splitlines()[0] == f"sweep hand: 3 trials under MLflow run {newest} (FINISHED)"
    with pytest.raises(SystemExit, match=r"^pqsweep-report: objective 'top1:up'.*direction must be max or min"):
        table.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--objectives", "top1:up"])


def test_what_it_prints_writes_and_says_on_stderr(store, tmp_path, capsys):
    uri, client, experiment = store
    parent, ids = log_sweep(client, experiment)
    out_dir = tmp_path / "out"
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--out", str(out_dir),
                "--columns", " pruning , ,top1,front "])
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0] == f"sweep hand: 4 trials under MLflow run {parent} (FINISHED)"
    assert lines[1] == "baseline (fp32, dense): top1 92.00%, size 1.0000 MB, gzip 0.9000 MB, p50 0.100 ms"
    # the table in grid order (fp16 before none, then gm before l1), then the front over the sweep's own objectives
    assert lines[2:8] == table.render(["pruning", "top1 %", "front"], [["gm", "80.00", "*"], ["gm", "99.00", ""],
                                      ["gm", "90.00", "*"], ["l1", "70.00", ""]]).splitlines()
    # A's box 20 x 0.5, B's 10 x 0.8, their overlap 10 x 0.5, against (70, 1.0): 13
    assert lines[8:] == ["front of hand over top1 (max), size_mb (min): 2 trials, hypervolume 13",
                         "  reference: top1=70 (worst trial), size_mb=1 (baseline)", f"wrote 3 files under {out_dir}"]
    assert printed.err == "1 trial(s) failed: see their `error` tag in MLflow\n"
    assert sorted(p.name for p in out_dir.iterdir()) == ["table.csv", "table.md", "table.tex"]


def test_without_objectives_of_its_own_the_front_is_over_top1_and_size_and_nothing_failed_is_quiet(store, tmp_path,
                                                                                               capsys):
    uri, client, experiment = store
    log_sweep(client, experiment, trials=HAND[:3], objectives=None, baseline=False)
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log"])
    printed = capsys.readouterr()
    assert "front of hand over top1 (max), size_mb (min): 2 trials, hypervolume " in printed.out
    assert "baseline (fp32" not in printed.out and printed.err == ""
    # no objective to maximise: the plots still show top1, against the first size minimised; no baseline to mark
    out = tmp_path / "out"
    table.main(["hand", "--uri", uri, "--no-log", "--out", str(out), "--objectives", "size_gzip_mb:min,size_mb:min"])
    assert "front of hand over size_gzip_mb (min), size_mb (min): 1 trials" in capsys.readouterr().out
    assert {"top1_vs_size_gzip_mb.png", "top1_vs_size_gzip_mb.html"} <= {p.name for p in out.iterdir()}


def test_two_sweeps_each_get_a_front_line_and_one_folder_and_neither_is_logged_to(store, tmp_path, capsys):
    uri, client, experiment = store
    a, a_ids = log_sweep(client, experiment, name="a")
    b, _ = log_sweep(client, experiment, name="b", trials=[("Z", "gm", "none", "FAILED", 1.0, 1.0)])
    table.main(["a", "b", "--uri", uri, "--no-plots"])
    out = capsys.readouterr().out
    assert "front of a over top1 (max), size_mb (min): 2 trials, hypervolume 13\n" in out
    assert "front of b over top1 (max), size_mb (min): 0 trials, hypervolume 0\n" in out  # against a's reference
    assert (tmp_path / "reports" / "a+b" / "table.csv").is_file()  # the default --out
    assert "pareto" not in client.get_run(a_ids["A"]).data.tags and not client.list_artifacts(a)


def test_the_front_only_and_the_tables_written_where_asked(store, tmp_path, capsys):
    uri, client, experiment = store
    log_sweep(client, experiment)
    paths = {ext: tmp_path / f"mine.{ext}" for ext in ("csv", "md", "tex")}
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--front", "--columns", "pruning,quantization,top1",
                "--csv", str(paths["csv"]), "--markdown", str(paths["md"]), "--latex", str(paths["tex"])])
    body = [["gm", "fp16", "80.00"], ["gm", "none", "90.00"]]  # B and A, the front, in grid order
    header = ["pruning", "quant", "top1 %"]
    assert capsys.readouterr().out.split("\n", 2)[2].startswith(table.render(header, body) + "\n")
    out = tmp_path / "reports" / "hand"
    assert paths["md"].read_text() == (out / "table.md").read_text() == table.markdown(header, body)
    assert paths["tex"].read_text() == (out / "table.tex").read_text() == table.latex(header, body)
    with open(paths["csv"], newline="") as f:
        assert list(csv.reader(f)) == [["pruning", "quantization", "top1 (%)"], ["gm", "fp16", "80.0"],
                                       ["gm", "none", "90.0"]]
    assert (out / "table.csv").read_text() == paths["csv"].read_text()


def test_write_outputs_hands_back_the_files_it_wrote_under_out(tmp_path):
    trials = [run("a", params={"pruning": "gm"}, metrics={"top1": 90.0})]
    s = sweep("s", trials)
    rows = [table.Row(s, trials[0], True)]
    args = table.parse(["s", "--no-plots", "--csv", str(tmp_path / "mine.csv")])
    out = tmp_path / "out"
    written = table.write_outputs(args, out, [table.column("top1", trials)], rows, rows, ["top1 %"], [["90.00"]], [s],
                                  [TOP1, SIZE], [])
    assert written == [out / "table.csv", out / "table.md", out / "table.tex"] == sorted(out.iterdir())
    assert (tmp_path / "mine.csv").read_text() == (out / "table.csv").read_text()


def test_a_budget_prints_each_methods_most_compressed_trial_with_its_run(store, capsys):
    uri, client, experiment = store
    _, ids = log_sweep(client, experiment)
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--columns", "pruning,top1,size_mb,front,status,sweep",
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
    parent, ids = log_sweep(client, experiment)
    table.main(["hand", "--uri", uri, "--no-plots", "--out", str(tmp_path / "out")])
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
    parent, ids = log_sweep(client, experiment, trials=[("F", "gm", "none", "FAILED", 1.0, 1.0)])
    table.main(["hand", "--uri", uri, "--no-plots"])
    assert "front of hand over top1 (max), size_mb (min): 0 trials, no hypervolume\n" in capsys.readouterr().out
    tags = client.get_run(parent).data.tags
    assert tags["pareto_front_size"] == "0" and "pareto_hypervolume" not in tags
    assert tags["pareto_reference"] == "no finished trial has every objective"
    assert client.get_run(ids["F"]).data.tags["pareto"] == "false"


PAPER_CSV = ("source,table,row,column,value,unit,match,metric,factor\n"
             "p.txt,Table I,dense,Top-1 (%),91.5,%,quantization=none,top1,1\n"
             "p.txt,Table I,half,Top-1 (%),79.0,%,quantization=fp16,top1,\n")


def test_a_papers_tables_are_printed_and_written_beside_ours(store, tmp_path, capsys):
    uri, client, experiment = store
    log_sweep(client, experiment, trials=HAND[:2])
    paper = tmp_path / "p.paper.csv"
    paper.write_text(PAPER_CSV)
    out = tmp_path / "out"
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--out", str(out), "--paper", str(paper)])
    header = ["row", "Top-1 (%) ours", "Top-1 (%) paper", "Top-1 (%) Δ"]
    body = [["dense", "90.0", "91.5", "-1.5"], ["half", "80.0", "79.0", "+1.0"]]
    printed = capsys.readouterr().out
    assert ("p.txt, Table I: ours (mean ± sd over seeds where several), the paper's value, ours - paper\n"
            + table.render(header, body) + "\n") in printed
    assert f"wrote 6 files under {out}\n" in printed
    with open(out / "paper-table_i.csv", newline="") as f:
        assert list(csv.reader(f)) == [header, *body]
    assert (out / "paper-table_i.md").read_text() == "p.txt, Table I\n\n" + table.markdown(header, body)
    assert (out / "paper-table_i.tex").read_text() == table.latex(header, body)
    with pytest.raises(SystemExit, match=f"^pqsweep-report: --paper {tmp_path / 'none.csv'}: no such file$"):
        table.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--paper", str(tmp_path / "none.csv")])


def test_a_papers_values_kept_beside_a_sweep_file_are_found_for_that_sweep_alone():
    name = "alexnet_cifar10_sparsity_x_precision"  # sweeps/<name>.paper.csv
    assert table.paper_tables(None, [sweep(name, [])], [])[0][0].endswith("Table II")
    assert table.paper_tables(None, [sweep(name, []), sweep("other", [])], []) == []  # two sweeps: none
    assert table.paper_tables(None, [sweep("mine", [])], []) == []


def journal_study(tmp_path, name="hand", values=((90.0, 0.5), (80.0, 0.2), (70.0, 0.3))):
    """An Optuna study in a journal file, as `pqsweep -m` keeps one: its trials' numbers are the runs' tags."""
    url = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name=name, directions=["maximize", "minimize"],
                                storage=optuna.storages.JournalStorage(JournalFileBackend(url)))
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v)))
    return url


def test_the_optuna_study_a_parent_names_is_opened_unless_it_cannot_be(tmp_path):
    url = journal_study(tmp_path)

    def parent(**tags):
        return Sweep("s", run("p", tags=tags), [], None)

    assert table.optuna_study(parent(), None) == (None, "not an Optuna study")
    assert table.optuna_study(parent(optuna_study="hand"), None) == (None, "not an Optuna study")
    assert table.optuna_study(parent(optuna_storage=url), None) == (None, "not an Optuna study")
    study, why = table.optuna_study(parent(optuna_study="hand", optuna_storage=url), None)
    assert (study.study_name, len(study.trials), why) == ("hand", 3, "")
    masked = "postgresql+psycopg://me:***@db/optuna"
    assert table.optuna_study(parent(optuna_study="hand", optuna_storage=masked), None) == (
        None, f"its storage's password is masked ({masked}): give --storage")
    study, why = table.optuna_study(parent(optuna_study="hand", optuna_storage=masked), url)  # --storage wins
    assert study.study_name == "hand" and why == ""
    study, why = table.optuna_study(parent(optuna_study="nope", optuna_storage=url), None)
    assert study is None and why.startswith(f"cannot open study nope at {url}: KeyError: ")


def test_optunas_agreement_is_printed_where_the_front_is_over_the_studys_own_objectives(store, tmp_path, capsys):
    uri, client, experiment = store
    url = journal_study(tmp_path)
    log_sweep(client, experiment, trials=HAND[:3], parent_tags={"optuna_study": "hand", "optuna_storage": url})
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log"])
    assert "Optuna's best_trials are this front (2 trials)\n" in capsys.readouterr().out
    table.main(["hand", "--uri", uri, "--no-plots", "--no-log", "--objectives", "top1:max,size_gzip_mb:min"])
    assert "Optuna's best_trials" not in capsys.readouterr().out


def figure(path):
    """(traces, layout) of the plotly figure an HTML plot holds, as JSON."""
    html = path.read_text()
    traces, end = json.JSONDecoder().raw_decode(html, html.index("[", html.index("Plotly.newPlot(")))
    return traces, json.JSONDecoder().raw_decode(html, html.index("{", end))[0]


def test_the_plots_are_of_the_maximised_objective_against_the_most_compressed_and_optunas_views(store, tmp_path, capsys):
    uri, client, experiment = store
    url = journal_study(tmp_path)
    log_sweep(client, experiment, trials=HAND[:3], parent_tags={"optuna_study": "hand", "optuna_storage": url})
    out = tmp_path / "out"
    table.main(["hand", "--uri", uri, "--no-log", "--out", str(out), "--objectives", "size_gzip_mb:min,top5:max"])
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}; import subprocess; print(subprocess.run(["python3", "/tmp/mutA_draft/plot_probe.py", str(out / "top5_vs_size_gzip_mb.html")], capture_output=True, text=True).stdout)
    assert files == {"table.csv", "table.md", "table.tex", "top5_vs_size_gzip_mb.png", "top5_vs_size_gzip_mb.html",
                     "optuna-hand/optuna_pareto_front.html", "optuna-hand/optuna_hypervolume_history.html"}
    assert f"wrote {len(files)} files under {out}\n" in capsys.readouterr().out
    traces, layout = figure(out / "top5_vs_size_gzip_mb.html")  # each trial at its own point, and the baseline
    points = [(t["meta"]["sweep"], x, y) for t in traces if t["meta"]["kind"] == "points" for x, y in zip(t["x"], t["y"])]
    assert sorted(points) == [("hand", 0.1, 85.0), ("hand", 0.15, 75.0), ("hand", 0.25, 95.0)]
    assert [(t["x"], t["y"]) for t in traces if t["meta"]["kind"] == "baseline"] == [([0.9], [97.0])]
    assert layout["title"]["text"] == "top5 vs size_gzip_mb — hand"
