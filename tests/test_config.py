"""Config tests: every group option composes, instantiates and validates; bad input fails early in one line."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from pqsweep import pipeline
from pqsweep.config import ConfigError, Engine, register, validate
from pqsweep.preflight import check

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register()

GROUPS = ["model", "dataset", "pruning", "quantization", "sweep"]
METHOD_GROUPS = ["model", "dataset", "pruning", "quantization"]  # groups whose options name a `_target_`


def options(group: str) -> list[str]:
    """The options of a group as the files in conf/<group>/ (new files are covered without editing this test)."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def compose_cfg(*overrides: str, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_has_options():
    assert all(options(group) for group in GROUPS)
    assert {"cnn", "resnet18", "resnet18_cifar", "vgg16_bn"} <= set(options("model"))


# --- every option composes -------------------------------------------------------------------------------------


def group_options(groups: list[str]) -> list:
    return [pytest.param(g, o, id=f"{g}={o}") for g in groups for o in options(g)]


@pytest.mark.parametrize("group, option", group_options(GROUPS))
def test_option_composes_and_its_targets_resolve(group, option):
    cfg = compose_cfg(f"{group}={option}", hydra=True)
    # every interpolation resolves (but Hydra's own node's, like ${now:}, which need a running app)
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), resolve=True)
    for g in METHOD_GROUPS:
        assert callable(get_method(cfg[g]._target_)), f"{g}._target_={cfg[g]._target_}"
    if group == "sweep":
        assert cfg.study.name == option
        assert callable(get_method(cfg.hydra.sweeper._target_))
        assert callable(get_method(cfg.hydra.sweeper.sampler._target_))
        for key in cfg.hydra.sweeper.params:  # the grid names keys and groups that exist
            assert key in GROUPS or OmegaConf.select(cfg, key, default=KeyError) is not KeyError, key
    else:
        assert cfg[group].name == option  # the `name` each run logs is the option it was composed from


@pytest.mark.parametrize("group, option", group_options(METHOD_GROUPS))
def test_misspelt_field_fails_at_composition(group, option):
    # every option is typed by its group's schema: a misspelt field fails at composition with Hydra's message
    with pytest.raises(ConfigCompositionException, match="not_a_field"):
        compose_cfg(f"{group}={option}", f"{group}.not_a_field=1")


IMAGE_SIZE = {"alexnet": 64}  # AlexNet needs >= 63 px; the rest run at 32


@pytest.mark.parametrize("model, dataset", [(m, "fake") for m in options("model")] + [("cnn", "digits")])
def test_model_builds_and_runs_a_forward_pass(model, dataset):
    fake = ["dataset.num_samples=8", f"dataset.image_size={IMAGE_SIZE.get(model, 32)}"] if dataset == "fake" else []
    cfg = compose_cfg(f"model={model}", f"dataset={dataset}", *fake)
    torch.manual_seed(0)
    splits, loaders = pipeline.load_data(cfg)
    net = pipeline.build_model(cfg, splits).eval()
    x, _ = next(iter(loaders["test"]))
    with torch.no_grad():
        logits = net(x[:2])
    assert logits.shape == (2, splits.num_classes) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "model, pruning, quantization",
    [pytest.param(*combination, id="-".join(combination))
     for combination in itertools.product(options("model"), options("pruning"), options("quantization"))],
)
def test_methods_compose_with_every_model(model, pruning, quantization):
    cfg = compose_cfg(f"model={model}", f"pruning={pruning}", f"quantization={quantization}")
    validate(cfg)
    assert (cfg.model.name, cfg.pruning.name, cfg.quantization.name) == (model, pruning, quantization)


def test_readme_command_composes(monkeypatch, tmp_path):
    # pqsweep --cfg job model=vgg16_bn dataset=cifar10 pruning=global_magnitude quantization=static_int8
    monkeypatch.setenv("PQSWEEP_DATA", str(tmp_path))
    cfg = compose_cfg("model=vgg16_bn", "dataset=cifar10", "pruning=global_magnitude", "quantization=static_int8")
    validate(cfg)
    assert cfg.model._target_ == "pqsweep.models.vgg16_bn"
    assert cfg.dataset.root == f"{tmp_path}/cifar10"  # data root from $PQSWEEP_DATA
    assert cfg.pruning.amount == 0.5 and cfg.quantization.bits == 8
    assert cfg.quantization.engine == Engine.x86 and cfg.quantization.granularity == "per_channel"
    assert "vgg16_bn" in OmegaConf.to_yaml(cfg, resolve=True)


# --- validate --------------------------------------------------------------------------------------------------

OUT_OF_RANGE = [
    "pruning.amount=-0.1",
    "pruning.amount=1.0",
    "quantization.bits=1",
    "train.epochs=-1",
    "train.finetune_epochs=-1",
    "train.batch_size=0",
    "dataset.val_fraction=0",
    "dataset.val_fraction=1",
    "measure.threads=0",
    "measure.repeats=1",
    "device=tpu",
]
AT_THE_EDGE = [
    "pruning.amount=0",
    "pruning.amount=0.99",
    "quantization.bits=16",
    "train.epochs=0",
    "train.finetune_epochs=0",
    "train.batch_size=1",
    "dataset.val_fraction=0.5",
    "measure.threads=1",
    "measure.repeats=2",
    "device=cuda",
    "device=cuda:1",
]


@pytest.mark.parametrize("override", OUT_OF_RANGE)
def test_validate_rejects_out_of_range(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ is not allowed: must be ") as error:
        validate(compose_cfg(override))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override", AT_THE_EDGE)
def test_validate_accepts_the_edges(override):
    validate(compose_cfg(override))


# --- preflight: bad input in one line, before anything runs ----------------------------------------------------

BAD_INPUT = {
    "unknown model": (["model=nope"], ["model=nope", *options("model")]),
    "amount out of range": (["pruning.amount=1.5"], ["pruning.amount", "1.5", "[0, 1)"]),
    "unknown engine": (["quantization=static_int8", "quantization.engine=foo"],
                       ["quantization.engine", "foo", "x86", "fbgemm", "qnnpack"]),
    "unknown backend": (["quantization=static_int8", "quantization.backend=foo"],
                        ["quantization.backend", "foo", "fx", "pt2e"]),
    "pt2e outside static_int8": (["quantization=qat_int8", "quantization.backend=pt2e"],
                                 ["quantization.backend=pt2e", "static_int8"]),
    "structured pruning after quantization": (
        ["pruning=l1_filter", "quantization=static_int8", "quantization.order=quantize_then_prune"],
        ["pruning=l1_filter", "quantize_then_prune", "global_magnitude", "layer_magnitude", "random"]),
    "missing layer amounts file": (["pruning=layer_magnitude", "pruning.layer_amounts=/nonexistent/amounts.yaml"],
                                   ["pruning.layer_amounts=/nonexistent/amounts.yaml", "existing YAML file"]),
    "misspelt key": (["train.epoch=3"], ["train.epoch", "epochs"]),
    "wrong type": (["train.epochs=abc"], ["train.epochs", "abc"]),
    "bad grid value": (["pruning.amount=0,0.5,1.2"], ["pruning.amount=1.2"]),
    "bad grid option": (["quantization=none,fp8"], ["quantization=fp8", *options("quantization")]),
    "bad range value": (["train.epochs=range(-1,2)"], ["train.epochs=-1"]),
    "unknown sweep": (["sweep=nope"], ["sweep=nope", *options("sweep")]),
    "unknown objective": (["study.objectives=[top_1]"], ["study.objectives", "top1", "size_mb"]),
    "directions vs objectives": (["sweep=mnist_cnn_sparsity_x_precision", "study.objectives=[top1]"],
                                 ["hydra.sweeper.direction", "2 direction(s)", "1 study.objectives"]),
}


@pytest.mark.parametrize("overrides, expected", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_preflight_names_the_key_and_what_is_allowed(overrides, expected):
    message = check(overrides, CONF_DIR)
    assert message is not None and "\n" not in message
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize("overrides", [
    [],
    ["sweep=mnist_cnn_sparsity_x_precision"],
    ["pruning=global_magnitude", "pruning.amount=0,0.5,0.9", "quantization=none,fp16,static_int8"],
    ["pruning.amount=interval(0, 0.9)"],  # continuous: the sweeper samples inside the bounds
])
def test_preflight_passes_good_input(overrides):
    assert check(overrides, CONF_DIR) is None


SWEEP_WITH_BAD_GRID = """\
# @package _global_
defaults:
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: grid
hydra:
  sweeper:
    params:
      pruning.amount: choice(0, 0.5, 1.5)
      quantization: choice(none, fp16)
"""


@pytest.fixture
def conf_with_bad_grid(tmp_path) -> Path:
    """A copy of conf/ with one more sweep file, whose grid holds a value validate refuses."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)  # conf/sweep is a link: the copy holds the files themselves
    (conf / "sweep" / "bad_grid.yaml").write_text(SWEEP_WITH_BAD_GRID)
    return conf


def test_preflight_checks_a_sweep_files_own_grid(conf_with_bad_grid):
    message = check(["sweep=bad_grid"], conf_with_bad_grid)
    assert message is not None and message.startswith("pruning.amount=1.5 is not allowed")
    assert check(["sweep=bad_grid", "pruning.amount=0,0.5"], conf_with_bad_grid) is None  # a grid replaces a grid


def test_preflight_lets_a_fixed_value_replace_a_sweep_files_grid(conf_with_bad_grid):
    assert check(["sweep=bad_grid", "pruning.amount=0.5"], conf_with_bad_grid) is None


@pytest.mark.parametrize("override", ["quantization=glob(*)", "model=glob(resnet*)"])
def test_preflight_accepts_glob_sweeps_over_a_group(override):
    assert check([override], CONF_DIR) is None


def test_preflight_reports_an_unparsable_override_in_one_line():
    message = check(["pruning.amount=("], CONF_DIR)
    assert message is not None and "\n" not in message and "pruning.amount" in message


def test_cli_refuses_bad_input_before_running_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pqsweep.cli", "model=nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("pqsweep: error: model=nope is not an option; allowed: ")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".pqsweep_cache").exists()
    assert list(tmp_path.iterdir()) == []  # not even Hydra's outputs/ folder: nothing ran
