"""A paper's values kept as data beside its sweep, its formulas against its own rows, and the report in the paper's
layout with the paper's value and the difference beside ours."""

from __future__ import annotations

import math
import statistics

import mlflow
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pqsweep.reports import paper, report

SWEEP = "mnist_cnn_sparsity_x_precision"  # the make run grid: seed 004's Table I at cpu scale


@pytest.fixture(scope="module")
def cells():
    path = paper.beside(SWEEP)
    assert path is not None, "the paper's values ship beside the sweep file"
    return paper.load(path)


def test_seed_004_tables_i_and_iii_are_stored_as_printed(cells):
    table_i = [c for c in cells if c.table == "Table I"]
    assert len(table_i) == 18 * 4 and len([c for c in cells if c.table == "Table III"]) == 18
    first = {c.column: c for c in table_i if c.row == "0 / 32"}
    assert first["Size (bytes)"].value == "78,170" and first["Size (bytes)"].published == 78170
    assert first["Reduction Factor"].value == "-" and first["Reduction Factor"].published is None
    assert {c.row for c in table_i} >= {"0.90 / 8", "0.99 / 16"}  # the rows as the paper writes them
    assert {c.metric for c in cells} <= {"size_gzip_mb", "reduction_factor_gzip", "top1", "top1_delta", "q_004"}
    assert all(set(c.match) == {"pruning.amount", "quantization.bits"} for c in cells)


def test_q_of_table_iii_follows_from_table_i_by_eq_5(cells):
    # CNN at 0 % / 16 bit: (0 + 8/16) / 2 * tanh(-0.37) * sigmoid(4.43) = -0.0875
    assert paper.q_004({"sparsity": 0.0, "top1_delta": -0.37, "reduction_factor_gzip": 4.43},
                       {"quantization.bits": "16"}) == pytest.approx(-0.0875, abs=5e-5)
    table_i = {(c.row, c.column): c.published for c in cells if c.table == "Table I"}
    checked = 0
    for cell in cells:
        if cell.table != "Table III" or cell.published is None:
            continue
        sparsity, bits = cell.row.split(" / ")
        q = paper.q_004({"sparsity": float(sparsity), "top1_delta": table_i[cell.row, "Δ Accuracy (%)"],
                         "reduction_factor_gzip": table_i[cell.row, "Reduction Factor"]}, {"quantization.bits": bits})
        assert q == pytest.approx(cell.published, abs=1.5e-4), cell.row  # inputs printed to 2 decimals, Q to 4
        checked += 1
    assert checked == 17  # every row but the baseline's "-"


def test_the_report_prints_the_papers_rows_and_columns_with_ours_and_the_difference(tmp_path, capsys):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    experiment = client.create_experiment("pqsweep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": SWEEP}).info.run_id
    # 0.5 / 8 at two seeds (its cells are their mean and spread), 0 / 16 at one; no other point ran
    trials = [("0.5", "8", 0, 96.0, 0.008), ("0.5", "8", 1, 97.0, 0.010), ("0.0", "16", 0, 95.5, 0.0356)]
    for amount, bits, seed, top1, gzip_mb in trials:
        run = client.create_run(experiment, tags={"stage": "trial", "sweep": SWEEP, "mlflow.parentRunId": parent})
        metrics = {"top1": top1, "size_gzip_mb": gzip_mb, "top1_delta": top1 - 95.6, "sparsity": float(amount),
                   "reduction_factor_gzip": 0.0697 / gzip_mb}
        client.log_batch(run.info.run_id, params=[Param("pruning.amount", amount), Param("quantization.bits", bits),
                                                  Param("train.seed", str(seed))],
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
    report.main([SWEEP, "--uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-plots", "--no-log", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    cited = 'Ishtiaq et al. (2021), "An Evaluation of Model Compression & Optimization Combinations" [004_e4042dc0bebbda7b.txt]'
    assert f"{cited}, Table I:" in out and f"{cited}, Table III:" in out
    section = out.split("Table I:")[1].split("Table III:")[0]
    lines = section.splitlines()
    assert "Size (bytes) ours" in lines[1] and "Size (bytes) paper" in lines[1] and "Accuracy (%) Δ" in lines[1]
    row = next(line for line in lines if line.strip().startswith("0.5 / 8"))
    sd = statistics.stdev([8000, 10000])
    assert f"9,000 ± {sd:,.0f} (n=2)" in row and "8,173" in row and "+827" in row  # ours, the paper's, the Δ
    assert "96.50 ± 0.71 (n=2)" in row and "97.15" in row and "-0.65" in row
    untouched = next(line for line in lines if line.strip().startswith("0.90 / 8"))
    assert untouched.split()[3:6] == ["-", "5,331", "-"]  # not run: ours and Δ empty, the paper's value stands
    q_row = next(line for line in out.split("Table III:")[1].splitlines() if line.strip().startswith("0 / 16"))
    q = (0 + 8 / 16) / 2 * math.tanh(95.5 - 95.6) / (1 + math.exp(-0.0697 / 0.0356))
    assert f"{q:.4f}" in q_row and "-0.0875" in q_row
    assert (tmp_path / "paper-table_i.md").read_text().startswith(f"{cited}, Table I\n")
    assert (tmp_path / "paper-table_iii.csv").is_file()


def test_alexnets_q_of_table_iii_follows_from_table_ii_by_eq_5():
    """The AlexNet column of Table III from Table II's values (seed 004's second sweep file)."""
    cells = paper.load(paper.beside("alexnet_cifar10_sparsity_x_precision"))
    table_ii = {(c.row, c.column): c.published for c in cells if c.table == "Table II"}
    assert len(table_ii) == 18 * 4 and table_ii["0 / 32", "Size (bytes)"] == 656_296_182
    assert table_ii["0.99 / 8", "Reduction Factor"] == 41.97 and table_ii["0.5 / 16", "Accuracy (%)"] == 88.30
    q = {c.row: c for c in cells if c.table == "Table III"}
    assert set(q) == {row for row, _ in table_ii} and {c.column for c in q.values()} == {"AlexNet"}
    assert q["0 / 32"].published is None  # the baseline's "-"
    for row, cell in q.items():
        if cell.published is None:
            continue
        sparsity, bits = row.split(" / ")
        ours = paper.q_004({"sparsity": float(sparsity), "top1_delta": table_ii[row, "Δ Accuracy (%)"],
                            "reduction_factor_gzip": table_ii[row, "Reduction Factor"]}, {"quantization.bits": bits})
        assert ours == pytest.approx(cell.published, abs=1.5e-4), row


# --- what the trials ran on, against what the paper used ---------------------------------------------------------


def ran_sweep(tmp_path, dataset, scale, images, top1=55.28):
    """The 0 / 32 and 0.5 / 8 points of SWEEP as a real trial logs them: its params (pqsweep.records.params of the
    composed config, at the given data and scale) and its splits as MLflow inputs. Returns the report's output."""
    from nets import compose_cfg

    from pqsweep import records

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment("pqsweep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": SWEEP}).info.run_id
    cfg = compose_cfg(f"sweep={SWEEP}", f"scale={scale}", f"dataset={dataset}")
    data = dict(zip(("train", "val", "test"), images)) | {"image_size": 28, "in_channels": 1, "num_classes": 10}
    for amount, bits in (("0.0", "32"), ("0.5", "8")):
        run = client.create_run(experiment, tags={"stage": "trial", "sweep": SWEEP, "mlflow.parentRunId": parent})
        params = records.params(cfg) | {"pruning.amount": amount, "quantization.bits": bits}
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in {"top1": top1, "size_gzip_mb": 0.07, "sparsity": float(amount),
                                                                   "top1_delta": -1.0, "reduction_factor_gzip": 1.0}.items()])
        with mlflow.start_run(run_id=run.info.run_id):
            records.log_inputs(cfg, data)
        client.set_terminated(run.info.run_id, "FINISHED")
    report.main([SWEEP, "--uri", uri, "--no-plots", "--no-log", "--out", str(tmp_path / "out")])


def table_i(out: str) -> dict[str, str]:
    """Table I's 0 / 32 row as {column: cell}, split on the printed table's two-space gaps."""
    lines = out.split("Table I:")[1].splitlines()
    header = [h for h in lines[1].strip().split("  ") if h]
    row = next(line for line in lines if line.strip().startswith("0 / 32"))
    return dict(zip(header, [c.strip() for c in row.strip().split("  ") if c.strip()]))


def test_a_stand_in_run_says_its_data_and_scale_and_marks_its_accuracy_not_comparable(tmp_path, capsys):
    ran_sweep(tmp_path, "digits", "cpu", (1293, 144, 360))
    out = capsys.readouterr().out
    assert ("  ran on: data digits (train 1,293 / val 144 / test 360 images, 10 classes), scale cpu, epochs 20 "
            "baseline + 4 fine-tune, seeds 0, weights trained here\n") in out
    cells = table_i(out)
    assert cells["Accuracy (%) ours"] == "55.28 †" and cells["Accuracy (%) paper"] == "98.17"
    assert cells["Accuracy (%) Δ"] == "-42.89 †"
    assert cells["Size (bytes) ours"] == "70,000" and cells["Size (bytes) Δ"] == "-8,170"  # the network's: compared
    assert ("  † not comparable with the paper (Accuracy (%), Δ Accuracy (%)): ours ran on data digits, not the paper's mnist and "
            "scale cpu, not paper; accuracy depends on the data and the training") in out
    q = out.split("Table III:")[1]
    assert "†" in q  # Q is made of Δ accuracy: marked too
    assert "† not comparable" in (tmp_path / "out" / "paper-table_i.md").read_text()


def test_the_papers_own_data_at_paper_scale_is_compared_unmarked(tmp_path, capsys):
    ran_sweep(tmp_path, "mnist", "paper", (42000, 18000, 10000), top1=98.0)
    out = capsys.readouterr().out
    assert "  ran on: data mnist (train 42,000 / val 18,000 / test 10,000 images, 10 classes), scale paper, epochs 12 " \
           "baseline + 12 fine-tune" in out
    cells = table_i(out)
    assert cells["Accuracy (%) ours"] == "98.00" and cells["Accuracy (%) Δ"] == "-0.17"
    assert "†" not in out.split("Table I:")[1]


def test_every_paper_is_cited_by_title_author_and_year():
    cited = paper.citations()
    files = {c.source for name in ("mnist_cnn_sparsity_x_precision", "resnet18_imagenet_ptq_then_prune",
                                   "resnet18_cifar10_structured_pruning", "vgg16_bn_cifar10_compression_summary",
                                   "compact_alexnet_fmnist_overfit_prune") for c in paper.load(paper.beside(name))}
    assert files == set(cited) and len(files) == 5  # every paper a sweep reproduces, and no other
    assert cited["002_e778e29164e4c1fd.txt"] == ('Berrada and Zighed (2025), "Optimizing Accuracy/Score Tradeoff: '
                                                 'Pruning & Quantization methods" [002_e778e29164e4c1fd.txt]')
    assert paper.cited("p.txt") == "p.txt"  # a hand-made table keeps its own name


def test_the_vgg_pruning_plus_qat_row_says_why_it_is_matched_to_dynamic_int8():
    cells = paper.load(paper.beside("vgg16_bn_cifar10_compression_summary"))
    row = [c for c in cells if c.row == "Pruning + QAT"]
    assert row and all(c.match["quantization"] == "dynamic_int8" and "Fig. 11" in c.note for c in row)
    (_, _, _, notes), = paper.tables([c for c in cells if c.table == "Fig. 13"], [])
    assert notes == ["Pruning + QAT: matched to pruning + dynamic int8, not QAT: the paper's own Fig. 11 prints this "
                     "row as pruning + dynamic PTQ"]
