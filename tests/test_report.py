"""pqsweep-report: every cell of its table is the run's own metric, parameter or status, rows in grid order. Then the
table's helpers on runs built in memory: the LaTeX and markdown text to the character, which column a name becomes,
the default columns' order, grid order for keys that are not numbers, the method label, what "most compressed" means,
hypervolumes and their reference, budgets, Optuna's agreement line, the CSV's empty and 1 / 0 cells, the files
write_outputs hands back and a paper's values kept beside a sweep file."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag
from mlflow.tracking import MlflowClient

from pqsweep.reports import report, table
from pqsweep.reports.pareto import Objective
from pqsweep.reports.sweeps import Sweep

# Each column and where its cells come from, written out here rather than read from pqsweep.metrics: a column that
# reads the wrong metric must fail. (header, CSV header, kind, key, format)
EXPECTED = [
    ("pruning", "pruning", "params", "pruning", "{}"),
    ("amount", "pruning.amount", "params", "pruning.amount", "{}"),
    ("quant", "quantization", "params", "quantization", "{}"),
    ("bits", "quantization.bits", "params", "quantization.bits", "{}"),
    ("sparsity", "sparsity", "metrics", "sparsity", "{:.3f}"),
    ("top1 %", "top1 (%)", "metrics", "top1", "{:.2f}"),
    ("Δ top1", "top1_delta (pp)", "metrics", "top1_delta", "{:+.2f}"),
    ("size MB", "size_mb (MB)", "metrics", "size_mb", "{:.4f}"),
    ("gzip MB", "size_gzip_mb (MB)", "metrics", "size_gzip_mb", "{:.4f}"),
    ("sparse MB", "size_sparse_mb (MB)", "metrics", "size_sparse_mb", "{:.4f}"),
    ("reduction", "reduction_factor (x)", "metrics", "reduction_factor", "{:.2f}x"),
    ("gzip red.", "reduction_factor_gzip (x)", "metrics", "reduction_factor_gzip", "{:.2f}x"),
    ("p50 ms", "latency_ms_p50 (ms)", "metrics", "latency_ms_p50", "{:.3f}"),
    ("status", "status", "info", "status", "{}"),
]
METRIC_KEYS = [key for _, _, kind, key, _ in EXPECTED if kind == "metrics"]

# Three trials, deliberately logged out of grid order; every metric gets a value no other metric of the same run
# has at the precision it is printed with, so a column that reads another metric shows another number.
TRIALS = [
    {"pruning": "global_magnitude", "pruning.amount": "0.9", "quantization": "static_int8", "quantization.bits": "8"},
    {"pruning": "global_magnitude", "pruning.amount": "0.0", "quantization": "none", "quantization.bits": "32"},
    {"pruning": "global_magnitude", "pruning.amount": "0.0", "quantization": "fp16", "quantization.bits": "16"},
]


def metric_values(trial: int) -> dict[str, float]:
    return {key: round(1.1 * (i + 1) + 0.2345 * trial + 0.0001 * i, 4) for i, key in enumerate(METRIC_KEYS)}


@pytest.fixture
def store(tmp_path):
    """A sweep as `pqsweep -m` logs it: a parent run, its trials as children, and their baseline."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment("pqsweep", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": "grid"}).info.run_id
    for number, params in enumerate(TRIALS):
        tags = {"stage": "trial", "sweep": "grid", "baseline_hash": "b" * 16, "mlflow.parentRunId": parent}
        run = client.create_run(experiment, tags=tags).info.run_id
        client.log_batch(run, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metric_values(number).items()])
        client.set_terminated(run, "FAILED" if number == 2 else "FINISHED")
    baseline = client.create_run(experiment, tags={"stage": "baseline", "baseline_hash": "b" * 16}).info.run_id
    client.log_batch(baseline, metrics=[Metric(k, v, 0, 0) for k, v in
                                        {"top1": 97.25, "size_mb": 0.0766, "size_gzip_mb": 0.0697,
                                         "latency_ms_p50": 0.324}.items()])
    return uri


def test_every_cell_is_its_runs_value(store, tmp_path, capsys):
    # The CSV holds the runs' numbers as logged (units in its header); the markdown holds them formatted.
    report.main(["grid", "--uri", store, "--csv", str(tmp_path / "table.csv"), "--markdown", str(tmp_path / "t.md"),
                "--columns", ",".join(key for _, _, _, key, _ in EXPECTED), "--no-plots", "--out", str(tmp_path / "r")])
    out = capsys.readouterr()
    with open(tmp_path / "table.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == [name for _, name, *_ in EXPECTED]
    md = [[c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "t.md").read_text().splitlines()]
    assert md[0] == [name for name, *_ in EXPECTED]
    # rows in grid order: amount, then precision from high to low
    order = [1, 2, 0]
    assert [(row[1], row[2]) for row in rows] == [(TRIALS[i]["pruning.amount"], TRIALS[i]["quantization"])
                                                  for i in order]
    for row, cells, number in zip(rows, md[2:], order):
        source = {"params": TRIALS[number], "metrics": metric_values(number),
                  "info": {"status": "FAILED" if number == 2 else "FINISHED"}}
        for (name, _, kind, key, fmt), cell, shown in zip(EXPECTED, row, cells):
            expected = source[kind][key]
            assert (float(cell) if kind == "metrics" else cell) == expected, f"CSV column {name!r} of trial {number}"
            assert shown == fmt.format(expected), f"markdown column {name!r} of trial {number}"
    assert "sweep grid: 3 trials under MLflow run" in out.out
    assert "baseline (fp32, dense): top1 97.25%, size 0.0766 MB, gzip 0.0697 MB, p50 0.324 ms" in out.out
    assert "1 trial failed: see its `error` tag" in out.err


# --- the table's helpers, on runs built in memory ---------------------------------------------------------------


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

    assert report.agreement(study(0, 1), rows, s) == "Optuna's best_trials are this front (2 trials)"
    assert report.agreement(study(0, 1, 2, discarded=(2,)), rows, s) == "Optuna's best_trials are this front (2 trials)"
    assert report.agreement(study(1, 2), rows, s) == ("Optuna's best_trials differ from this front: only Optuna [2], "
                                                      "only here [0]")


# --- the files --------------------------------------------------------------------------------------------------


def test_the_csv_holds_numbers_an_empty_cell_for_a_missing_one_and_the_front_as_1_or_0(tmp_path):
    trials = [run("a", params={"pruning": "gm"}, metrics={"top1": 90.5}), run("b", params={"pruning": "gm"})]
    s = sweep("s", trials)
    columns = [table.column(k, trials) for k in ("pruning", "top1", "front")]
    table.write_csv(tmp_path / "t.csv", columns, [table.Row(s, trials[0], True), table.Row(s, trials[1], False)])
    with open(tmp_path / "t.csv", newline="") as f:
        assert list(csv.reader(f)) == [["pruning", "top1 (%)", "front"], ["gm", "90.5", "1"], ["gm", "", "0"]]


def test_write_outputs_hands_back_the_files_it_wrote_under_out(tmp_path):
    trials = [run("a", params={"pruning": "gm"}, metrics={"top1": 90.0})]
    s = sweep("s", trials)
    rows = [table.Row(s, trials[0], True)]
    args = report.parse(["s", "--no-plots", "--csv", str(tmp_path / "mine.csv")])
    out = tmp_path / "out"
    written = report.write_outputs(args, out, [table.column("top1", trials)], rows, rows, ["top1 %"], [["90.00"]], [s],
                                  [TOP1, SIZE], [], ["ran on: data digits"])
    assert written == [out / "table.csv", out / "table.md", out / "table.tex"] == sorted(out.iterdir())
    assert (tmp_path / "mine.csv").read_text() == (out / "table.csv").read_text()


def test_a_papers_values_kept_beside_a_sweep_file_are_found_for_that_sweep_alone():
    name = "alexnet_cifar10_sparsity_x_precision"  # sweeps/<name>.paper.csv
    assert report.paper_tables(None, [sweep(name, [])], [])[0][0].endswith("Table II")
    assert report.paper_tables(None, [sweep(name, []), sweep("other", [])], []) == []  # two sweeps: none
    assert report.paper_tables(None, [sweep("mine", [])], []) == []
