"""A researcher's own model, data set and pruner, from a folder of their own, without forking pqsweep.

The folder holds option files (conf/model/tiny_mlp.yaml, conf/dataset/quadrants.yaml, conf/pruning/nm_sparse.yaml)
that start from pqsweep's family schemas, and one module (mylab.py, on PYTHONPATH) their `_target_`s name. Hydra
finds the folder through `--config-dir <folder>` or `hydra.searchpath=[file://<folder>]`; the pre-run check composes
with the same search path, so their options are validated like the built-in ones. Also here: docs/extending.md's worked
example of adding a method is the committed code, and the commit that added it touched nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pqsweep.schema import register
from pqsweep.preflight import check
from nets import experiment_ids

REPO = Path(__file__).resolve().parents[1]
register()  # check() composes against the schemas in Hydra's ConfigStore (pqsweep.cli registers them on import)

OPTIONS = {
    "model/tiny_mlp.yaml": """\
        # A two-layer perceptron on a 4x4 average-pooled image.
        defaults:
          - /schema/model/model@_here_
          - _self_

        _target_: mylab.tiny_mlp
        name: tiny_mlp
        """,
    "dataset/quadrants.yaml": """\
        # Which quadrant of a noisy image is bright: synthetic, made in memory. The fake-data schema has the fields.
        defaults:
          - /schema/dataset/fake@_here_
          - _self_

        _target_: mylab.quadrants
        name: quadrants
        num_samples: 400
        image_size: 8
        channels: 1
        num_classes: 4
        """,
    "pruning/nm_sparse.yaml": """\
        # N:M sparsity: in every group of 4 consecutive weights, the round(4 * amount) smallest are zeroed.
        defaults:
          - /schema/pruning/pruning@_here_
          - _self_

        _target_: mylab.nm_sparse
        name: nm_sparse
        amount: 0.5
        stored_weights: false
        per_layer: false
        """,
}

MODULE = '''\
"""A researcher's own model factory, data set builder and pruner: plain functions with pqsweep's signatures."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pqsweep.data import DataSplits

GROUP = 4  # nm_sparse: weights are zeroed within groups of this many consecutive ones


def tiny_mlp(num_classes, in_channels, pretrained=False):
    if pretrained:
        raise ValueError("model.pretrained=true: tiny_mlp has no pretrained weights")
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(in_channels * 16, 32), nn.ReLU(),
                         nn.Linear(32, num_classes))


def quadrants(cfg):
    generator = torch.Generator().manual_seed(cfg.split_seed)
    n, size, half = cfg.num_samples, cfg.image_size, cfg.image_size // 2
    labels = torch.arange(n) % cfg.num_classes
    images = torch.randn(n, cfg.channels, size, size, generator=generator) * 0.5
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label % 4, 2)
        images[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 2.0
    order = torch.randperm(n, generator=generator)
    images, labels = images[order], labels[order]
    n_test = n // 5
    n_val = max(1, round((n - n_test) * cfg.val_fraction))

    def part(start, stop):
        return TensorDataset(images[start:stop], labels[start:stop])

    return DataSplits(part(n_test + n_val, n), part(n_test, n_test + n_val), part(0, n_test), cfg.num_classes,
                      cfg.channels, size)


@torch.no_grad()
def nm_sparse(model, cfg, ctx):
    zeros = round(cfg.amount * GROUP)
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            groups = layer.weight.view(-1, GROUP)
            groups.scatter_(1, groups.abs().argsort(dim=1)[:, :zeros], 0.0)
    return model
'''

# tiny_mlp on 1-channel images, 4 classes: Linear(16 -> 32) and Linear(32 -> 4)
WEIGHTS = 16 * 32 + 32 * 4
PARAMS = WEIGHTS + 32 + 4


@pytest.fixture
def own(tmp_path) -> Path:
    """The researcher's folder: conf/ with their option files, src/ with their module."""
    folder = tmp_path / "mylab"
    for name, text in OPTIONS.items():
        path = folder / "conf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(re.sub(r"(?m)^ {8}", "", text))
    (folder / "src").mkdir()
    (folder / "src" / "mylab.py").write_text(MODULE)
    return folder


def where(folder: Path, how: str) -> list[str]:
    """The command-line arguments that put the researcher's configs on Hydra's search path."""
    conf = folder / "conf"
    return ["--config-dir", str(conf)] if how == "config-dir" else [f"hydra.searchpath=[file://{conf}]"]


def checked(folder: Path, how: str, *overrides: str) -> str | None:
    """pqsweep.preflight.check in this process, finding the folder the way `how` says."""
    if how == "config-dir":
        return check(list(overrides), config_dir=str(folder / "conf"))
    return check([*where(folder, how), *overrides])


HOW = ["config-dir", "searchpath"]
OWN = ["model=tiny_mlp", "dataset=quadrants", "pruning=nm_sparse"]


# --- the pre-run check, in this process -------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("overrides", [
    OWN,
    [*OWN, "pruning.amount=0.75", "dataset.num_samples=200"],
    [*OWN, "pruning.amount=0,0.5,0.75", "quantization=none,fp16"],  # a grid over their pruner
    ["model=tiny_mlp,cnn", "pruning=nm_sparse,global_magnitude"],  # theirs and the built-in ones side by side
], ids=["defaults", "values", "grid", "beside-built-in"])
def test_check_accepts_their_options(own, how, overrides):
    assert checked(own, how, *overrides) is None


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("bad, built_in, message", [
    (["pruning.amount=1.5"], ["pruning=global_magnitude"],
     "pruning.amount=1.5 is not allowed: must be a fraction in [0, 1)"),
    (["pruning.amount=0,0.5,1.2"], ["pruning=global_magnitude"],
     "pruning.amount=1.2 is not allowed: must be a fraction in [0, 1)"),
    (["dataset.num_samples=3"], ["dataset=fake"], "dataset.num_samples=3 is not allowed: must be an integer >= 10"),
    (["dataset.val_fraction=0"], ["dataset=fake"], "dataset.val_fraction=0.0 is not allowed: must be in (0, 1)"),
], ids=["amount", "amount-in-grid", "num_samples", "val_fraction"])
def test_check_refuses_their_bad_values_like_the_built_in_ones(own, how, bad, built_in, message):
    assert checked(own, how, *OWN, *bad) == message
    # the same value with a built-in option gets the same line: the family schema checks it, not the method
    assert checked(own, how, *built_in, *bad) == message


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("group, typo, theirs", [
    ("model", "tiny_mpl", "tiny_mlp"), ("dataset", "quadrant", "quadrants"), ("pruning", "nm_sparsee", "nm_sparse")])
def test_check_lists_their_options_among_the_allowed_ones(own, how, group, typo, theirs):
    message = checked(own, how, f"{group}={typo}")
    assert message is not None and message.startswith(f"{group}={typo} is not an option; allowed: ")
    allowed = message.split("allowed: ", 1)[1].split(", ")
    assert theirs in allowed, message
    assert {"model": "cnn", "dataset": "digits", "pruning": "global_magnitude"}[group] in allowed


def test_without_their_folder_their_options_do_not_exist(own):
    assert checked(own, "config-dir", "pruning=nm_sparse") is None
    assert check(["pruning=nm_sparse"]).startswith("pruning=nm_sparse is not an option; allowed: ")


# --- the command line: refused in one line before anything trains ---------------------------------------------


def pqsweep(folder: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The installed `pqsweep` console script, with the researcher's module importable (PYTHONPATH)."""
    script = Path(sys.executable).parent / "pqsweep"
    assert script.is_file(), f"no console script next to {sys.executable}"
    env = {**os.environ, "PYTHONPATH": str(folder / "src")}
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def paths(tmp_path: Path) -> list[str]:
    out = tmp_path / "out"
    return [f"tracking.uri=sqlite:///{out}/mlflow.db", f"cache.dir={out}/cache", f"hydra.run.dir={out}/run"]


@pytest.mark.parametrize("how", HOW)
def test_the_cli_refuses_their_bad_amount_before_anything_runs(own, tmp_path, how):
    work = tmp_path / "work"
    work.mkdir()
    done = pqsweep(own, work, *where(own, how), *OWN, "pruning.amount=1.5", *paths(tmp_path))
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.splitlines() == ["pqsweep: error: pruning.amount=1.5 is not allowed: must be a fraction in [0, 1)"]
    assert done.stdout == ""
    assert not (tmp_path / "out").exists() and list(work.iterdir()) == []  # no MLflow store, cache or outputs


@pytest.mark.parametrize("how", HOW)
def test_the_cli_lists_their_pruner_when_a_pruning_option_is_misspelt(own, tmp_path, how):
    done = pqsweep(own, tmp_path, *where(own, how), "pruning=nm_sparsee", *paths(tmp_path))
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("pqsweep: error: pruning=nm_sparsee is not an option; allowed: ")
    assert "nm_sparse" in line.split("allowed: ", 1)[1].split(", "), line


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how, amount", [("config-dir", None), ("searchpath", 0.75)])
def test_their_model_data_and_pruner_run_end_to_end(own, tmp_path, how, amount):
    """amount None: their option file's own 0.5; 0.75 from the command line."""
    extra = [] if amount is None else [f"pruning.amount={amount}"]
    (tmp_path / "out").mkdir()  # the store's folder: a store in one that does not exist is refused
    done = pqsweep(own, tmp_path, *where(own, how), *OWN, *extra, "train.epochs=3", "train.optimizer.lr=0.01",
                   "train.finetune_epochs=1", "measure.warmup=1", "measure.repeats=3", *paths(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    assert (done.stdout + done.stderr).count("not in cache, training 3 epochs") == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/out/mlflow.db")
    experiments = experiment_ids(client)
    (trial,) = client.search_runs(experiments, "tags.stage = 'trial'")
    (baseline,) = client.search_runs(experiments, "tags.stage = 'baseline'")
    assert trial.info.status == "FINISHED" and baseline.info.status == "FINISHED"
    params, metrics = trial.data.params, trial.data.metrics
    assert (params["model"], params["dataset"], params["pruning"]) == ("tiny_mlp", "quadrants", "nm_sparse")
    assert params["model._target_"] == "mylab.tiny_mlp" and params["pruning._target_"] == "mylab.nm_sparse"
    promised = 0.5 if amount is None else amount
    assert float(params["pruning.amount"]) == promised
    # what their pruner promises: round(4 * amount) of every 4 weights zero, kept zero through the fine-tuning
    assert metrics["sparsity"] == pytest.approx(promised, abs=1e-9)
    assert metrics["params_total"] == PARAMS
    assert metrics["params_nonzero"] == PARAMS - promised * WEIGHTS
    assert baseline.data.metrics["sparsity"] == 0 and baseline.data.metrics["params_total"] == PARAMS
    # their data set is learnable and their model learns it: far above the 25 % of chance
    assert metrics["baseline_top1"] >= 90 and metrics["top1"] >= 80


# --- the worked example in docs/extending.md ---------------------------------------------------------------------

EXAMPLE = {"yaml": "conf/quantization/weight_only_int8.yaml", "python": "src/pqsweep/quantization/weight_only.py"}


def docs_section(title: str, page: str = "docs/extending.md") -> str:
    text = (REPO / page).read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{page} has no section '## {title}'"
    return match.group(1)


def test_the_docs_worked_example_is_the_committed_code():
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", docs_section("Adding a method"), re.M | re.S)
    for language, path in EXAMPLE.items():
        shown = [body for lang, body in blocks if lang == language and body.startswith(f"# {path}\n")]
        assert len(shown) == 1, f"'## Adding a method' has {len(shown)} ```{language} blocks starting '# {path}'"
        assert shown[0].split("\n", 1)[1] == (REPO / path).read_text(), \
            f"docs/extending.md's {path} differs from the file"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def test_the_worked_example_was_one_option_file_and_one_module():
    assert git("rev-parse", "--is-shallow-repository").strip() == "false", \
        "a shallow clone shows its first commit adding every file: this test needs the history"
    (commit,) = git("log", "--format=%H", "--diff-filter=A", "--", EXAMPLE["yaml"]).split()
    touched = git("show", "--format=", "--name-only", commit).split()
    assert sorted(touched) == sorted(EXAMPLE.values()), touched
