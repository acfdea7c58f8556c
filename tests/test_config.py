"""Config tests: every option composes, instantiates and validates; a bad value fails early, in one line naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method
from omegaconf import OmegaConf

from pqsweep import cli, pipeline
from pqsweep.metrics import METRICS, OBJECTIVES, directions
from pqsweep.options import Engine
from pqsweep.schema import TrainConfig
from pqsweep.checks import ConfigError
from pqsweep.validate import validate
from pqsweep.preflight import check

from nets import compose_cfg, options, write_cifar10, write_data_sets

GROUPS = ["model", "dataset", "pruning", "quantization", "train", "sweep"]
METHOD_GROUPS = ["model", "dataset", "pruning", "quantization"]  # groups whose options name a `_target_`


def test_every_group_has_options():
    assert all(options(group) for group in GROUPS)
    assert {"cnn", "resnet18", "resnet18_cifar", "vgg16_bn"} <= set(options("model"))


# --- every option composes -------------------------------------------------------------------------------------


def group_options(groups: list[str]) -> list:
    return [pytest.param(g, o, id=f"{g}={o}") for g in groups for o in options(g)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(write_data_sets(tmp_path_factory.mktemp("data")))


@pytest.fixture
def data_roots(data_dir, monkeypatch):
    """The on-disk options' roots (${oc.env:PQSWEEP_DATA}) at tiny copies of their files: validate looks there."""
    monkeypatch.setenv("PQSWEEP_DATA", data_dir)


@pytest.mark.parametrize("group, option", group_options(GROUPS))
def test_option_composes_with_the_defaults_validates_and_its_targets_resolve(group, option, data_roots):
    cfg = compose_cfg(f"{group}={option}", hydra=True)
    if cfg.model.min_image_size > cfg.dataset.image_size:  # alexnet and vgg16_bn need more than digits' 8 px
        cfg = compose_cfg(f"{group}={option}", f"dataset.resize={cfg.model.min_image_size}", hydra=True)
    if cfg.quantization.needs_zeros and not cfg.pruning.zeroes_weights:  # sparse stores the zeros pruning leaves
        cfg = compose_cfg(f"{group}={option}", "pruning=global_magnitude", hydra=True)
    validate(cfg)
    # every interpolation resolves (but Hydra's own node's, like ${now:}, which need a running app)
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), resolve=True)
    for g in METHOD_GROUPS:
        assert callable(get_method(cfg[g]._target_)), f"{g}._target_={cfg[g]._target_}"
    if group == "sweep":
        assert cfg.study.name == option
        assert callable(get_method(cfg.hydra.sweeper._target_))
        assert callable(get_method(cfg.hydra.sweeper.sampler._target_))
        params = cfg.hydra.sweeper.params
        for key in params:  # the space names keys and groups that exist; a method's own key (fake_quant's
            # bits_w) under some option of its swept group, the only trials the sweeper gives it to
            group = key.rpartition(".")[0]
            swept = OverridesParser.create().parse_override(f"{group}={params[group]}") if group in params else None
            under = [cfg] + [compose_cfg(f"sweep={option}", f"{group}={o}", hydra=True)
                             for o in (swept.sweep_string_iterator() if swept else [])]
            assert key in (*GROUPS, "experiment") or any(OmegaConf.select(c, key, default=KeyError) is not KeyError for c in under), key
    elif group != "train":  # a recipe is its values (a baseline's key hashes them), it carries no name
        assert cfg[group].name == option  # the `name` each run logs is the option it was composed from


@pytest.mark.parametrize("group, option", group_options(METHOD_GROUPS))
def test_misspelt_field_fails_at_composition(group, option):
    # every option is typed by its group's schema: a misspelt field fails at composition with Hydra's message
    with pytest.raises(ConfigCompositionException, match="not_a_field"):
        compose_cfg(f"{group}={option}", f"{group}.not_a_field=1")


@pytest.mark.parametrize("model, dataset", [(m, "fake") for m in options("model")] + [("cnn", "digits")])
def test_model_builds_and_runs_a_forward_pass(model, dataset):
    # Where the model matters: it is built from its option for the data set's channels and classes, and runs, on
    # fake data at the smallest side its option file declares (the pre-run check holds every data set to it).
    side = compose_cfg(f"model={model}").model.min_image_size
    fake = ["dataset.num_samples=10", f"dataset.image_size={side}"] if dataset == "fake" else []
    cfg = compose_cfg(f"model={model}", f"dataset={dataset}", *fake)
    torch.manual_seed(0)
    splits, loaders = pipeline.load_data(cfg)
    net = pipeline.build_model(cfg, splits).eval()
    x, _ = next(iter(loaders["test"]))
    with torch.no_grad():
        logits = net(x[:2])
        if dataset == "fake" and side > 1:  # and the fact is the smallest: one pixel less fails
            with pytest.raises(RuntimeError):
                net(x[:2, :, : side - 1, : side - 1])
    assert logits.shape == (2, splits.num_classes) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


# --- every pruning x quantization pair -------------------------------------------------------------------------

# validate() never reads the model, so the pairs are checked on the default one; the models are covered above and
# by the real runs (test_methods, test_structured). Named here, not read from the option files, so that a wrong
# `stored_weights` fact in a file fails this test: these change float weights (fine-tuning between rounds, sparse
# learning, removing filters), which a quantized model does not have.
FLOAT_ONLY_PRUNING = {"iterative", "l1_filter", "structured_unstructured", "group_norm"}
# and this one stores the zeros pruning made (CSR), so it cannot come before the pruning, nor after one that leaves
# no zeros: these remove nothing, or whole filters
AFTER_PRUNING_ONLY = {"sparse"}
NO_ZEROS_PRUNING = {"none", "l1_filter", "group_norm"}


@pytest.mark.parametrize("order", ["prune_then_quantize", "quantize_then_prune"])
@pytest.mark.parametrize("quantization", options("quantization"))
@pytest.mark.parametrize("pruning", options("pruning"))
def test_every_pruning_and_quantization_pair_validates_or_is_refused_in_one_line(pruning, quantization, order):
    cfg = compose_cfg(f"pruning={pruning}", f"quantization={quantization}", f"quantization.order={order}")
    assert (cfg.pruning.name, cfg.quantization.name) == (pruning, quantization)
    if order == "quantize_then_prune" and quantization in AFTER_PRUNING_ONLY:
        with pytest.raises(ConfigError) as error:
            validate(cfg)
        assert str(error.value) == (f"quantization.order=quantize_then_prune is not allowed: must be "
                                    f"prune_then_quantize (what quantization={quantization} supports)")
    elif order == "quantize_then_prune" and pruning in FLOAT_ONLY_PRUNING:
        with pytest.raises(ConfigError) as error:
            validate(cfg)
        assert str(error.value) == (f"pruning={pruning} is not allowed: must be an option that prunes stored weights "
                                    "(its option file says stored_weights: true) with "
                                    "quantization.order=quantize_then_prune")
    elif quantization in AFTER_PRUNING_ONLY and pruning in NO_ZEROS_PRUNING:
        with pytest.raises(ConfigError) as error:
            validate(cfg)
        assert str(error.value) == (f"pruning={pruning} is not allowed: must be an option that leaves zeros among "
                                    f"the weights (its option file says zeroes_weights: true) with "
                                    f"quantization={quantization}, which stores them")
    else:
        validate(cfg)


def test_readme_command_composes(monkeypatch, tmp_path):
    # pqsweep --cfg job model=vgg16_bn dataset=cifar10 pruning=global_magnitude quantization=static_int8
    monkeypatch.setenv("PQSWEEP_DATA", str(tmp_path))
    write_cifar10(tmp_path / "cifar10")  # validate looks for the data where it will be read
    cfg = compose_cfg("model=vgg16_bn", "dataset=cifar10", "pruning=global_magnitude", "quantization=static_int8")
    validate(cfg)
    assert cfg.model._target_ == "pqsweep.models.vgg16_bn"
    assert cfg.dataset.root == f"{tmp_path}/cifar10"  # data root from $PQSWEEP_DATA
    assert cfg.pruning.amount == 0.5 and cfg.quantization.bits == 8
    assert cfg.quantization.engine == Engine.x86 and cfg.quantization.granularity == "per_channel"
    assert "vgg16_bn" in OmegaConf.to_yaml(cfg, resolve=True)


def test_objectives_take_their_directions_from_the_metrics():
    assert directions(["top1", "size_mb", "latency_ms_p50", "sparsity"]) == ["maximize", "minimize", "minimize",
                                                                             "maximize"]
    assert "latency_threads" in METRICS and "latency_threads" not in OBJECTIVES  # a setting, not a goal


def test_the_metrics_page_is_the_metrics_table():
    from pathlib import Path

    from pqsweep.metrics import markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    section = page.split("# Metrics (MLflow metric names)\n", 1)[1]
    assert markdown() in section, "docs/metrics.md: paste `python -m pqsweep.metrics`"
    assert section.count("\n- `") == len(METRICS)  # no metric described there that the table does not have
    sweep = compose_cfg("sweep=mnist_cnn_sparsity_x_precision", hydra=True)
    assert list(sweep.study.objectives) == ["top1", "size_gzip_mb"]  # a size that counts the zeros
    assert sweep.hydra.sweeper._target_ == "pqsweep.sweeper.OptunaSweeper"


# --- validate --------------------------------------------------------------------------------------------------

# (option overrides, the override whose key must be named); each pair refused, and its edge accepted below.
OUT_OF_RANGE = [
    ([], "pruning.amount=-0.1"),
    ([], "pruning.amount=1.0"),
    (["pruning=iterative"], "pruning.rounds=0"),
    (["pruning=iterative"], "pruning.round_epochs=-1"),
    (["pruning=structured_unstructured"], "pruning.structured=1.0"),
    (["pruning=structured_unstructured"], "pruning.unstructured=-0.5"),
    ([], "quantization.bits=1"),
    ([], "quantization.export_tolerance=0"),
    (["quantization=static_int8"], "quantization.calibration_batches=0"),
    (["quantization=qat_int8"], "quantization.qat_lr=0"),
    (["quantization=qat_int8"], "quantization.qat_epochs=-1"),
    (["quantization=fake_quant"], "quantization.bits_w=1"),
    (["quantization=fake_quant"], "quantization.bits_a=17"),
    (["quantization=mixed"], "quantization.layers.head=fp8"),
    ([], "train.epochs=-1"),
    ([], "train.finetune_epochs=-1"),
    ([], "train.finetune_lr=0"),
    ([], "train.batch_size=0"),
    ([], "train.seed=-1"),
    ([], "train.optimizer.lr=0"),
    ([], "train.optimizer.weight_decay=-0.1"),
    ([], "dataset.val_fraction=0"),
    ([], "dataset.val_fraction=1"),
    ([], "dataset.resize=0"),
    ([], "dataset.split_seed=-1"),
    (["dataset=fake"], "dataset.num_samples=9"),
    (["dataset=fake"], "dataset.image_size=0"),
    (["dataset=fake"], "dataset.channels=0"),
    (["dataset=fake"], "dataset.num_classes=1"),
    ([], "measure.eval_batch_size=0"),
    ([], "measure.threads=0"),
    ([], "measure.warmup=-1"),
    ([], "measure.repeats=1"),
    ([], "sensitivity.tolerance=-1"),
    ([], "sensitivity.split=test"),
    ([], "study.early_stop.min_epoch=0"),
    ([], "study.early_stop.min_trials=0"),
    ([], "study.early_stop.margin=-0.5"),
    (["study.objectives=[top5,size_mb]"], "study.early_stop.enabled=true"),  # its curve predicts top-1 only
    (["study.objectives=[size_mb]"], "study.early_stop.enabled=true"),
    ([], "device=tpu"),
    # an option's own facts: a key it ignores, zeros it needs, a format it cannot be written as, too few images
    ([], "pruning.amount=0.5"),
    (["pruning=structured_unstructured"], "pruning.amount=0.5"),
    (["quantization=sparse"], "pruning=l1_filter"),
    (["quantization=dynamic_int8"], "export=onnx"),
    ([], "dataset.num_samples=49"),
]
AT_THE_EDGE = [
    ([], "pruning.amount=0"),
    (["pruning=global_magnitude"], "pruning.amount=0.99"),
    (["pruning=iterative"], "pruning.rounds=1"),
    (["pruning=iterative"], "pruning.round_epochs=0"),
    (["pruning=structured_unstructured"], "pruning.structured=0"),
    ([], "quantization.bits=16"),
    ([], "quantization.export_tolerance=1e-9"),
    (["quantization=static_int8"], "quantization.calibration_batches=1"),
    (["quantization=qat_int8"], "quantization.qat_lr=1e-6"),
    (["quantization=qat_int8"], "quantization.qat_epochs=0"),
    (["quantization=fake_quant"], "quantization.bits_w=2"),
    (["quantization=fake_quant"], "quantization.bits_a=16"),
    (["quantization=mixed"], "quantization.layers.head=int8"),
    ([], "train.epochs=0"),
    ([], "train.finetune_epochs=0"),
    ([], "train.finetune_lr=1e-6"),
    ([], "train.batch_size=1"),
    ([], "train.seed=0"),
    ([], "train.optimizer.lr=1e-6"),
    ([], "train.optimizer.weight_decay=0"),
    ([], "dataset.val_fraction=0.5"),
    ([], "dataset.resize=4"),  # the small CNN's own minimum
    ([], "dataset.split_seed=0"),
    (["dataset=fake"], "dataset.num_samples=10"),
    (["dataset=fake", "model=resnet18"], "dataset.image_size=1"),  # a model that runs on 1 px (cnn needs 4)
    (["dataset=fake"], "dataset.channels=1"),
    (["dataset=fake"], "dataset.num_classes=2"),
    ([], "measure.eval_batch_size=1"),
    ([], "measure.threads=1"),
    ([], "measure.warmup=0"),
    ([], "measure.repeats=2"),
    ([], "sensitivity.tolerance=0"),
    ([], "sensitivity.split=train"),
    ([], "study.early_stop.min_epoch=1"),
    ([], "study.early_stop.min_trials=1"),
    ([], "study.early_stop.margin=0"),
    (["study.objectives=[top1_delta,size_mb]"], "study.early_stop.enabled=true"),
    ([], "dataset.num_samples=50"),
    (["quantization=static_int8", "quantization.backend=pt2e"], "export=onnx"),
    (["pruning=random"], "quantization=sparse"),
]  # device=cuda[:N] is accepted where a GPU is visible: test_bad_input, with a fake count of them


def case_id(case) -> str:
    return " ".join([*case[0], case[1]])


@pytest.mark.parametrize("base, override", OUT_OF_RANGE, ids=map(case_id, OUT_OF_RANGE))
def test_validate_rejects_out_of_range(base, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ is not allowed: must be ") as error:
        validate(compose_cfg(*base, override))
    assert "\n" not in str(error.value) and error.value.key == key


@pytest.mark.parametrize("base, override", AT_THE_EDGE, ids=map(case_id, AT_THE_EDGE))
def test_validate_accepts_the_edges(base, override):
    validate(compose_cfg(*base, override))


@pytest.fixture
def amounts_file(tmp_path) -> str:
    path = tmp_path / "amounts.yaml"
    path.write_text("'0': 0.5\n")
    return str(path)


def test_layer_amounts_need_a_per_layer_option(amounts_file):
    validate(compose_cfg("pruning=layer_magnitude", f"pruning.layer_amounts={amounts_file}"))
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg("pruning=global_magnitude", f"pruning.layer_amounts={amounts_file}"))
    assert str(error.value) == (f"pruning.layer_amounts={amounts_file} is not allowed: must be null: "
                                "pruning=global_magnitude takes one amount for all layers, not per-layer amounts")
    # iterative takes them only where it ranks layer by layer
    validate(compose_cfg("pruning=iterative", "pruning.scope=layer", f"pruning.layer_amounts={amounts_file}"))
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg("pruning=iterative", f"pruning.layer_amounts={amounts_file}"))
    assert str(error.value) == ("pruning.scope=global is not allowed: must be layer with pruning.layer_amounts "
                                "(global ranks all layers together)")


# --- preflight: bad input in one line, before anything runs ----------------------------------------------------

BAD_INPUT = {
    "unknown model": (["model=nope"], ["model=nope is not an option; allowed: ", *options("model")]),
    "amount out of range": (["pruning.amount=1.5"], ["pruning.amount=1.5 is not allowed: must be a fraction in [0, 1)"]),
    "unknown engine": (["quantization=static_int8", "quantization.engine=foo"],
                       ["quantization.engine", "foo", "x86", "fbgemm", "qnnpack"]),
    "unknown backend": (["quantization=static_int8", "quantization.backend=foo"],
                        ["quantization.backend", "foo", "fx", "pt2e"]),
    "pt2e outside static_int8": (["quantization=qat_int8", "quantization.backend=pt2e"],
                                 ["quantization.backend=pt2e is not allowed: must be fx (what quantization=qat_int8 "
                                  "supports)"]),
    "structured pruning after quantization": (
        ["pruning=l1_filter", "quantization=static_int8", "quantization.order=quantize_then_prune"],
        ["pruning=l1_filter is not allowed: must be an option that prunes stored weights", "quantize_then_prune"]),
    "CSR storage before pruning": (["quantization=sparse", "quantization.order=quantize_then_prune"],
                                   ["quantization.order=quantize_then_prune is not allowed: must be prune_then_quantize"]),
    "missing layer amounts file": (["pruning=layer_magnitude", "pruning.layer_amounts=/nonexistent/amounts.yaml"],
                                   ["pruning.layer_amounts=/nonexistent/amounts.yaml", "existing YAML file"]),
    "misspelt key": (["train.epoch=3"], ["train.epoch", "epochs"]),
    "wrong type": (["train.epochs=abc"], ["train.epochs", "abc"]),
    "bad grid value": (["pruning=global_magnitude", "pruning.amount=0,0.5,1.2"], ["pruning.amount=1.2 is not allowed"]),
    "bad grid option": (["quantization=none,fp8"], ["quantization=fp8", *options("quantization")]),
    "bad range value": (["train.epochs=range(-1,2)"], ["train.epochs=-1 is not allowed"]),
    "unknown sweep": (["sweep=nope"], ["sweep=nope", *options("sweep")]),
    "unknown objective": (["study.objectives=[top_1]"], ["study.objectives", "top1", "size_mb"]),
    "a setting as an objective": (["study.objectives=[latency_threads]"],
                                  ["study.objectives=['latency_threads'] is not allowed: must be metric names among"]),
}


@pytest.mark.parametrize("overrides, expected", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_preflight_names_the_key_and_what_is_allowed(overrides, expected):
    message = check(overrides)
    assert message is not None and "\n" not in message
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize("overrides", [
    [],
    ["sweep=mnist_cnn_sparsity_x_precision"],
    ["sweep=mnist_cnn_sparsity_x_precision", "study.objectives=[top1]"],  # directions follow the objectives
    ["pruning=global_magnitude", "pruning.amount=0,0.5,0.9", "quantization=none,fp16,static_int8"],
    ["pruning.amount=interval(0, 0.9)"],  # continuous: the sweeper samples inside the bounds
])
def test_preflight_passes_good_input(overrides):
    assert check(overrides) is None


SWEEP_WITH_BAD_GRID = """\
# @package _global_
defaults:
  - override /pruning: global_magnitude
  - override /hydra/sweeper: pqsweep
  - override /hydra/sweeper/sampler: grid
hydra:
  sweeper:
    params:
      pruning.amount: choice(0, 0.5, 1.5)
      quantization: choice(none, fp16)
"""


@pytest.fixture
def own_configs(tmp_path) -> str:
    """A user's config directory holding one more sweep file, whose grid holds a value validate refuses."""
    (tmp_path / "mine" / "sweep").mkdir(parents=True)
    (tmp_path / "mine" / "sweep" / "bad_grid.yaml").write_text(SWEEP_WITH_BAD_GRID)
    return str(tmp_path / "mine")


@pytest.mark.parametrize("where", ["--config-dir", "hydra.searchpath"])
def test_preflight_checks_a_sweep_files_own_grid_from_the_users_configs(own_configs, where):
    def checked(*overrides: str) -> str | None:
        if where == "--config-dir":
            return check(list(overrides), config_dir=own_configs)
        return check([*overrides, f"hydra.searchpath=[file://{own_configs}]"])

    assert checked("sweep=bad_grid") == "pruning.amount=1.5 is not allowed: must be a fraction in [0, 1)"
    assert checked("sweep=bad_grid", "pruning.amount=0,0.5") is None  # a command-line grid replaces the file's
    assert checked("sweep=bad_grid", "pruning.amount=0.5") is None  # and so does a fixed value


@pytest.mark.parametrize("override", ["quantization=glob(*)", "model=glob(resnet*)"])
def test_preflight_accepts_glob_sweeps_over_a_group(override):
    assert check(["pruning=global_magnitude", override]) is None  # sparse, among quantization's, needs its zeros


def test_preflight_reports_an_unparsable_override_in_one_line():
    message = check(["pruning.amount=("])
    assert message is not None and "\n" not in message and "pruning.amount" in message


def test_cli_main_refuses_bad_input_before_running_anything(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["pqsweep", "quantization=qat_int8", "quantization.backend=pt2e"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "pqsweep: error: quantization.backend=pt2e is not allowed: must be fx (what quantization=qat_int8 supports)"]
    assert list(tmp_path.iterdir()) == []  # the test runs in tmp_path: no outputs/, store or cache was made


@pytest.mark.slow
def test_cli_refuses_bad_input_before_running_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pqsweep.cli", "model=nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("pqsweep: error: model=nope is not an option; allowed: ")
    assert list(tmp_path.iterdir()) == []  # not even Hydra's outputs/ folder: nothing ran


def test_the_papers_recipes_are_what_the_papers_state():
    paper002 = compose_cfg("train=paper002_sgd_cosine").train
    assert (paper002.epochs, paper002.batch_size) == (200, 128)
    assert OmegaConf.to_container(paper002.optimizer) == {"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9,
                                                          "weight_decay": 5e-4}
    assert paper002.scheduler._target_.endswith("CosineAnnealingLR") and paper002.scheduler.T_max == 200
    paper004 = compose_cfg("train=paper004_12_epochs").train
    assert (paper004.epochs, paper004.finetune_epochs, paper004.batch_size) == (12, 12, 128)
    default = compose_cfg().train  # today's defaults, as the schema has them: nothing a baseline's key hashes moved
    assert OmegaConf.to_container(default) == OmegaConf.to_container(OmegaConf.structured(TrainConfig))


def test_the_fine_tuning_lr_is_resolved_so_the_logged_value_is_the_one_that_trains():
    from pqsweep.records import params as flat_params

    assert flat_params(compose_cfg())["train.finetune_lr"] == "0.0001"  # a tenth of Adam's 1e-3, never "None"
    assert flat_params(compose_cfg("train.optimizer.lr=0.05"))["train.finetune_lr"] == "0.005"
    assert flat_params(compose_cfg("train.finetune_lr=0.02"))["train.finetune_lr"] == "0.02"
    with pytest.raises(ConfigError, match=r"^train\.finetune_lr=None is not allowed: must be a learning rate > 0"):
        validate(compose_cfg("train.finetune_lr=null"))
