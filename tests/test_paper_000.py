"""Seed 000 (000_8199fa500cf6f522.txt, Figs. 12 and 13: ImageNet ResNet-18 and VGG16-BN fine-tuned on CIFAR-10 at
224 px, then PTQ, QAT, structured pruning and both): its sweep files at both scales, its values stored as printed,
each cell matched to one grid point, the report in the paper's layout, and its recipe's frozen layers
(train.trainable): frozen weights stay as they were, and params_trainable counts what trains."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.entities import Metric, Param, Run, RunData, RunInfo
from mlflow.tracking import MlflowClient
from nets import compose_cfg, grid_points
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from pqsweep.metrics import METRICS
from pqsweep.checks import ConfigError
from pqsweep.validate import validate
from pqsweep.models import resnet18
from pqsweep.reports import paper, report
from pqsweep.records import params as flat_params
from pqsweep.train import fit, trainable_parameters

PAPER = "000_8199fa500cf6f522.txt"
PAPER_TEXT = Path("/work/shared/papers") / PAPER  # the papers' texts, where this project keeps them
RESNET, VGG = "resnet18_cifar10_compression_summary", "vgg16_bn_cifar10_compression_summary"
COLUMNS = ["Accuracy (%)", "Size (MB)", "Latency (ms)", "Total params (M)", "Trainable Params (M)"]
ROWS = {RESNET: ["Baseline", "Dynamic Quantisation", "Static Quantisation", "QAT int_8", "Structured Pruning",
                 "QAT + Pruning"],
        VGG: ["Baseline", "Dynamic Quantisation", "Static Quantisation", "QAT", "Pruning", "Pruning + QAT"]}
FROZEN_RESNET = ["layer3", "layer4", "fc"]  # Sec. 2.1.2: "unfreeze layers 3 and 4 in addition to the classifier"


def cells(sweep: str) -> list[paper.Cell]:
    path = paper.beside(sweep)
    assert path is not None, "the paper's values ship beside the sweep file"
    return paper.load(path)


# -- the sweep files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sweep, model, trainable, points", [(RESNET, "resnet18", FROZEN_RESNET, 2 * 4 * 2),
                                                             (VGG, "vgg16_bn", None, 2 * 3)])
@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_the_sweep_files_compose_at_both_scales(sweep, model, trainable, points, scale):
    cfg = compose_cfg(f"sweep={sweep}", f"scale={scale}", hydra=True)
    paper_scale = scale == "paper"
    assert cfg.study.name == sweep + ("_paper" if paper_scale else "")  # the report finds the .paper.csv for both
    assert list(cfg.study.objectives) == ["top1", "size_mb"] and all(METRICS[m].direction for m in cfg.study.objectives)
    assert cfg.model.name == model and cfg.model.pretrained is paper_scale  # ImageNet weights: paper only
    assert cfg.dataset._target_ == ("pqsweep.data.cifar10" if paper_scale else "pqsweep.data.fake")
    assert cfg.dataset.resize == 224  # the paper's resolution at both scales
    # all of CIFAR-10 at paper scale, a few stand-in images at cpu scale
    assert cfg.dataset.num_samples == (None if paper_scale else 40 if sweep == RESNET else 30)
    if not paper_scale:
        assert cfg.dataset.num_classes == 10 and cfg.dataset.channels == 3
    # the recipe: one epoch at lr 1e-4, batch 32, only the unfrozen layers; 3 fine-tuning epochs after pruning
    assert cfg.train.epochs == 1 and cfg.train.optimizer.lr == 1e-4 and cfg.train.batch_size == 32
    assert (list(cfg.train.trainable) if cfg.train.trainable else None) == trainable
    assert cfg.train.finetune_epochs == (3 if paper_scale else 1) and cfg.train.finetune_lr == 1e-4
    assert cfg.pruning.name == "l1_filter" and cfg.pruning.scope.name == "layer"
    assert cfg.measure.warmup == 20 if paper_scale else cfg.measure.warmup < 20
    assert cfg.hydra.sweeper._target_ == "pqsweep.sweeper.OptunaSweeper"
    found = grid_points(sweep, scale)
    assert len(found) == points
    for point in found:  # every trial composes as the launcher composes it; cpu scale also validates
        trial = compose_cfg(f"sweep={sweep}", f"scale={scale}", *point)
        if not paper_scale:  # paper scale needs CIFAR-10 and the checkpoint on disk
            validate(trial)


@pytest.mark.parametrize("sweep", [RESNET, VGG])
def test_every_paper_cell_is_the_grid_point_of_its_row(sweep):
    """Each cell's `match` picks the trials of one (pruning amount, quantization) pair, every seed of it, by the
    params a trial logs; the VGG's QAT row (N/A in the paper) picks none, as that grid has no QAT."""
    def logged(point: list[str]) -> Run:
        params = flat_params(compose_cfg(f"sweep={sweep}", *point))
        info = RunInfo(run_id="-".join(point), experiment_id="0", user_id="", status="FINISHED", start_time=0,
                       end_time=0, lifecycle_stage="active")
        return Run(info, RunData(params=[Param(k, v) for k, v in params.items()]))

    runs = {tuple(point): logged(point) for point in grid_points(sweep, "cpu")}
    seeds = 2 if sweep == RESNET else 1
    chosen = {}
    for cell in cells(sweep):
        found = [point for point, r in runs.items() if paper.matches(r, cell.match)]
        if cell.value == "N/A":
            assert found == [], cell.row
            continue
        assert len(found) == seeds, f"{cell.row} {cell.column}: {found}"
        pairs = {tuple(p for p in point if not p.startswith("train.seed")) for point in found}
        chosen.setdefault(cell.row, set()).update(pairs)
    expected = {RESNET: {"Baseline": ("0", "none"), "Dynamic Quantisation": ("0", "dynamic_int8"),
                         "Static Quantisation": ("0", "static_int8"), "QAT int_8": ("0", "qat_int8"),
                         "Structured Pruning": ("0.3", "none"), "QAT + Pruning": ("0.3", "qat_int8")},
                # "Pruning + QAT" is pruning + dynamic int8 by the paper's own Fig. 11
                VGG: {"Baseline": ("0", "none"), "Dynamic Quantisation": ("0", "dynamic_int8"),
                      "Static Quantisation": ("0", "static_int8"), "Pruning": ("0.3", "none"),
                      "Pruning + QAT": ("0.3", "dynamic_int8")}}[sweep]
    assert chosen == {row: {(f"pruning.amount={a}", f"quantization={q}")} for row, (a, q) in expected.items()}


def test_figs_12_and_13_are_stored_as_printed():
    for sweep, fig in ((RESNET, "Fig. 12"), (VGG, "Fig. 13")):
        own = cells(sweep)
        assert {c.source for c in own} == {PAPER} and {c.table for c in own} == {fig}
        assert [(c.row, c.column) for c in own] == [(r, col) for r in ROWS[sweep] for col in COLUMNS]
        units = {"Accuracy (%)": ("%", "top1", 1), "Size (MB)": ("MB", "size_mb", 1),
                 "Latency (ms)": ("ms", "latency_ms_p50", 1), "Total params (M)": ("M", "params_total", 1e-6),
                 "Trainable Params (M)": ("M", "params_trainable", 1e-6)}
        assert all((c.unit, c.metric, c.factor) == units[c.column] for c in own)
        assert all(c.metric in METRICS for c in own)
    value = {(c.table, c.row, c.column): c.value for sweep in (RESNET, VGG) for c in cells(sweep)}
    # the summary tables' lines, digits as printed (13.56, not Fig. 10's 13.560; 90.9, not Fig. 6's 90.90)
    assert [value["Fig. 12", "Baseline", col] for col in COLUMNS] == ["92.49", "44.81", "83.343", "11.1", "10.5"]
    assert [value["Fig. 12", "QAT + Pruning", col] for col in COLUMNS] == ["87.26", "2.79", "13.56", "2.7", "2.7"]
    assert value["Fig. 12", "Static Quantisation", "Accuracy (%)"] == "91.80"
    assert value["Fig. 12", "QAT int_8", "Latency (ms)"] == "34.752"
    assert [value["Fig. 13", "Static Quantisation", col] for col in COLUMNS] == ["90.9", "134.57", "239.73",
                                                                                 "134.3", "134.3"]
    assert [value["Fig. 13", "QAT", col] for col in COLUMNS] == ["N/A"] * 5
    assert [value["Fig. 13", "Pruning + QAT", col] for col in COLUMNS] == ["84.24", "36.55", "239", "7.24", "7.24"]
    assert value["Fig. 13", "Dynamic Quantisation", "Total params (M)"] == "14.7"
    assert value["Fig. 13", "Baseline", "Latency (ms)"] == "355.76"  # Fig. 2 prints 355.767


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason=f"the paper's text is not at {PAPER_TEXT}")
def test_the_paper_text_holds_every_stored_value():
    """Each stored value is its table's line of the paper's text, cell for cell (a typo in the CSV fails here)."""
    text = PAPER_TEXT.read_text(encoding="utf-8")
    for sweep, fig in ((RESNET, "Figure 12"), (VGG, "Figure 13")):
        block = text.split(f"*{fig}")[0].rsplit("Model\tAccuracy", 1)[1]
        for row in ROWS[sweep]:
            line = next(line for line in block.splitlines() if line.startswith(f"<b>{row}</b>\t"))
            printed = line.split("\t")[1:]
            assert [c.value for c in cells(sweep) if c.row == row] == printed, row


# -- the report -----------------------------------------------------------------------------------------------------


def test_the_report_prints_fig_12_with_ours_beside_the_papers(tmp_path, capsys):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    experiment = client.create_experiment("pqsweep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, tags={"stage": "sweep", "sweep": RESNET}).info.run_id
    # static int8 at two seeds (its cells: their mean and spread), pruned + QAT at one; nothing else ran
    trials = [("0.0", "static_int8", 0, 10.0, 11.3115, 24.0, 11_176_842, 10_498_570),
              ("0.0", "static_int8", 1, 12.0, 11.3115, 26.0, 11_176_842, 10_498_570),
              ("0.3", "qat_int8", 0, 9.0, 5.5, 12.0, 5_400_000, 5_000_000)]
    for amount, quantization, seed, top1, size, p50, total, trainable in trials:
        r = client.create_run(experiment, tags={"stage": "trial", "sweep": RESNET, "mlflow.parentRunId": parent})
        params = {"quantization": quantization, "pruning": "l1_filter", "pruning.amount": amount,
                  "train.seed": str(seed)}
        metrics = {"top1": top1, "size_mb": size, "latency_ms_p50": p50, "params_total": float(total),
                   "params_trainable": float(trainable)}
        client.log_batch(r.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(r.info.run_id, "FINISHED")
    report.main([RESNET, "--uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-plots", "--no-log", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    section = out.split(f"[{PAPER}], Fig. 12:")[1]  # cited by title, author and year, the file beside
    header = section.splitlines()[1]
    assert all(f"{col} {part}" in header for col in COLUMNS for part in ("ours", "paper", "Δ"))

    def row(name: str) -> list[str]:
        line = next(line for line in section.splitlines() if line.strip().startswith(name))
        return re.split(r"\s{2,}", line.strip())

    # accuracy, size, latency (3 decimals, as the paper's 83.343), total and trainable params in M (1 decimal)
    assert row("Static Quantisation") == ["Static Quantisation", "11.00 ± 1.41 (n=2)", "91.80", "-80.80",
                                          "11.31 ± 0.00 (n=2)", "11.31", "+0.00", "25.000 ± 1.414 (n=2)", "31.596",
                                          "-6.596", "11.2 ± 0.0 (n=2)", "11.1", "+0.1", "10.5 ± 0.0 (n=2)", "10.5",
                                          "-0.0"]
    assert row("QAT + Pruning") == ["QAT + Pruning", "9.00", "87.26", "-78.26", "5.50", "2.79", "+2.71", "12.000",
                                    "13.56", "-1.560", "5.4", "2.7", "+2.7", "5.0", "2.7", "+2.3"]
    assert row("Baseline")[1:4] == ["-", "92.49", "-"]  # not run: ours and Δ empty, the paper's value stands
    assert (tmp_path / "paper-fig__12.md").read_text().startswith(f"{paper.cited(PAPER)}, Fig. 12")


# -- frozen layers (train.trainable) --------------------------------------------------------------------------------


def tiny_loader(n: int = 8, side: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=4)


def recipe(trainable) -> OmegaConf:
    return OmegaConf.create({"optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-2, "weight_decay": 0.0},
                             "scheduler": None, "trainable": trainable})


def test_frozen_layers_keep_their_weights_and_the_unfrozen_ones_train():
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    fit(model, tiny_loader(), recipe(FROZEN_RESNET), epochs=1)
    after = dict(model.named_parameters())
    frozen = [k for k in before if not k.startswith(("layer3.", "layer4.", "fc."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # conv1, bn1, layer1, layer2
    assert all(not after[k].requires_grad for k in frozen)
    moved = [k for k in before if k not in frozen and not torch.equal(before[k], after[k])]
    assert "fc.weight" in moved and any(k.startswith("layer3.") for k in moved) \
        and any(k.startswith("layer4.") for k in moved)


def test_without_trainable_every_layer_trains():
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=3)
    before = model.conv1.weight.detach().clone()
    fit(model, tiny_loader(), recipe(None), epochs=1)
    assert not torch.equal(before, model.conv1.weight) and model.conv1.weight.requires_grad


def test_params_trainable_counts_layer3_layer4_and_fc_of_resnet18():
    """Fig. 1: 10,498,570 trainable of 11,181,642 (93 %), exactly what torchvision's ResNet-18 holds in layer3,
    layer4 and a 10-way fc; a prefix names a module, so `layer` alone matches nothing."""
    model = resnet18(num_classes=10, in_channels=3)
    count = lambda prefixes: sum(p.numel() for _, p in trainable_parameters(model, prefixes))  # noqa: E731
    assert count(None) == count([]) == 11_181_642
    assert count(FROZEN_RESNET) == 10_498_570
    assert count(["fc"]) == 512 * 10 + 10
    assert count(["layer"]) == 0


def test_a_trainable_prefix_that_names_no_module_is_refused_in_one_line():
    model = resnet18(num_classes=10, in_channels=3)
    with pytest.raises(ConfigError, match=r"^train\.trainable=\['layer3', 'head'\] is not allowed: .*head names "
                                          r"no parameter$") as error:
        fit(model, tiny_loader(), recipe(["layer3", "head"]), epochs=1)
    assert "\n" not in str(error.value) and "conv1" in str(error.value)  # it lists what the model has


def test_trainable_is_in_the_baseline_key():
    from pqsweep.identity import stage_keys

    base = compose_cfg("model=resnet18", "dataset=fake")
    frozen = compose_cfg("model=resnet18", "dataset=fake", "train.trainable=[layer3,layer4,fc]")
    base, frozen = stage_keys(base), stage_keys(frozen)
    assert base["baseline"] != frozen["baseline"] and base["prune"] != frozen["prune"]


# -- structural cells (tests/test_structural.py has the fp32 ones and the ResNet-18's static int8 11.31 MB) ----------

QUANTIZED = [("ResNet-18, Fig. 12 dynamic PTQ size (MB)", ["model=resnet18", "quantization=dynamic_int8"], 44.79),
             ("VGG16-BN, Fig. 13 static PTQ size (MB)", ["model=vgg16_bn", "quantization=static_int8",
                                                         "quantization.calibration_batches=1"], 134.57)]


@pytest.mark.slow
@pytest.mark.parametrize("where, overrides, expected", QUANTIZED, ids=[q[0] for q in QUANTIZED])
def test_quantized_sizes_match_the_paper(make_cfg, where, overrides, expected):
    """A real run on fake data at 224 px (training changes no size): the paper's size within 1 %."""
    from pqsweep.pipeline import run

    cfg = make_cfg("dataset=fake", "dataset.resize=224", "dataset.num_samples=12", "train.epochs=0",
                   "train.batch_size=4", "measure.repeats=2", "measure.warmup=0", "measure.top5=false", *overrides,
                   tiny=False)
    assert run(cfg).metrics["size_mb"] == pytest.approx(expected, rel=0.01), where
