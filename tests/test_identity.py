"""What shapes a result is declared once, on the schema, and everything else follows from it: each field of each
option of each group changes exactly the stage keys it declares (and those built on them); a study's fixed settings,
a run's params and the sweeper's late keys come from the same declarations; a study stored before them resumes."""

from __future__ import annotations

import copy
import dataclasses
import json
from enum import Enum
from pathlib import Path

import optuna
import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from pqsweep import identity, pipeline
from pqsweep.identity import Role, declaration, stage_keys
from pqsweep.stages import STAGES, downstream
from pqsweep.schema import Config
from pqsweep.sweeper import space as spaces
from pqsweep.sweeper import study as studies
from pqsweep.sweeper.space import StudyMismatch

from nets import CONF_DIR, compose_cfg

OPTION_GROUPS = ("model", "dataset", "pruning", "quantization", "train")
SCHEMA_GROUPS = ("measure", "tracking", "cache", "study", "sensitivity", "launch")  # one schema, no option files


def all_options(group: str) -> list[str]:
    """Every option file of a group, those in subfolders too (dataset=cpu/cifar10)."""
    return sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in (CONF_DIR / group).rglob("*.yaml"))


def changed(value, path: str, tmp_path: Path):
    """Another value of the same type, one that a key holding the field would see."""
    if path.endswith("layer_amounts"):  # a file by its content
        amounts = tmp_path / "amounts.yaml"
        amounts.write_text('"0": 0.3\n')
        return str(amounts)
    if isinstance(value, bool):
        return not value
    if isinstance(value, Enum):
        members = list(type(value))
        return members[(members.index(value) + 1) % len(members)]
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.125
    if isinstance(value, str):
        return "cuda:1" if path == "device" else f"{value}_other"
    if isinstance(value, (list, ListConfig)):
        return list(value)[:-1] if path.endswith(("orders", "backends")) else list(value) + [
            {"study.objectives": "top5", "study.constraints": "size_mb<=1", "sensitivity.amounts": 0.33,
             "study.allocations": 0.25}.get(path,
                                                                                                           "extra")]
    if path in ("train.distill", "study.early_stop"):  # a node of its own schema: one of its fields changed
        return {**value, "enabled": not value["enabled"]}
    if isinstance(value, (dict, DictConfig)):
        per_layer = {"pruning.layer_sparsity": 0.5, "quantization.layer_bits": 4}  # {layer: a number}
        return {**value, "lr": 0.5} if path == "train.optimizer" else {**value, "extra": per_layer.get(path, "int8")}
    if value is None:
        return {"train.scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 1},
                "train.trainable": ["fc"], "train.finetune_lr": 0.5, "tracking.experiment": "x"}.get(path, 1)
    raise AssertionError(f"{path}: no other value for {value!r}")


def fields(cfg: DictConfig, group: str | None) -> list[tuple[str, type]]:
    """(dot path, schema) of every field under `group` (the root's own fields for None)."""
    if group is None:
        return [(f.name, Config) for f in dataclasses.fields(Config) if f.metadata]
    schema = OmegaConf.get_type(cfg[group])
    return [(f"{group}.{f.name}", schema) for f in dataclasses.fields(schema)]


CASES = [(g, o) for g in OPTION_GROUPS for o in all_options(g)] + [(g, None) for g in SCHEMA_GROUPS] + [(None, None)]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" if o else str(g) for g, o in CASES])
def test_each_field_changes_exactly_the_stage_keys_it_declares(group, option, tmp_path):
    base = compose_cfg(*([f"{group}={option}"] if option else []))
    before = stage_keys(base)
    applying = {name for name, key in before.items() if key is not None}
    for path, schema in fields(base, group):
        declared = declaration(schema, path.rsplit(".", 1)[-1])  # UndeclaredField: a field says nothing
        cfg = copy.deepcopy(base)
        value = OmegaConf.select(cfg, path)
        # a node of its own schema (train.distill, study.early_stop) takes the changed field merged in; others are replaced whole
        OmegaConf.update(cfg, path, changed(value, path, tmp_path), merge=path in ("train.distill", "study.early_stop"))
        after = stage_keys(cfg)
        moved = {name for name in STAGES if after[name] != before[name]}
        applies = applying | {name for name, key in after.items() if key is not None}  # a stage it switches on
        expected = downstream(declared.stages) & applies if declared.role == Role.shapes else set()
        assert moved == expected, f"{path} ({declared.role.value} {', '.join(declared.stages)})"


def test_a_field_without_a_declaration_is_refused_where_keys_are_derived():
    @dataclasses.dataclass
    class Undeclared:
        epochs: int = 1

    with pytest.raises(identity.UndeclaredField, match=r"^Undeclared.epochs declares no role: use shapes"):
        declaration(Undeclared, "epochs")


def test_shapes_names_only_declared_stages():
    with pytest.raises(ValueError, match="name stages among data, baseline"):
        identity.shapes("basline")


def test_the_stage_graph_is_declared_in_dependency_order():
    seen = set()
    for stage in STAGES.values():
        assert set(stage.after) <= seen, stage.name
        seen.add(stage.name)


def test_a_fake_set_of_another_image_size_trains_its_own_baseline(make_cfg):
    small = make_cfg("dataset=fake", "dataset.num_samples=64", "dataset.image_size=16", "train.epochs=1",
                     "measure.warmup=0", "measure.repeats=2")
    bigger = copy.deepcopy(small)
    bigger.dataset.image_size = 24
    first = pipeline.run(small)
    second = pipeline.run(bigger)  # before the declarations: "loaded from cache (trained nothing)", on 16 px weights
    assert first.baseline.cached is False and second.baseline.cached is False
    assert second.data["image_size"] == 24 and first.baseline.key != second.baseline.key


# --- what is derived from the declarations ----------------------------------------------------------------------

def test_a_studys_fixed_settings_are_what_shapes_its_trials_and_its_search():
    fixed = identity.fixed_settings(compose_cfg("sweep=mnist_cnn_sparsity_x_precision"), ["pruning.amount",
                                                                                        "quantization"])
    assert fixed["train.epochs"] == "20" and fixed["study.objectives"] == '["top1", "size_gzip_mb"]'
    assert fixed["train.optimizer.lr"] == "0.001" and fixed["device"] == '"cpu"'  # a mapping's keys, one by one
    assert not [k for k in fixed if k.startswith(("pruning.amount", "quantization"))]  # swept
    for left_out in ("model.min_image_size", "dataset.root", "dataset.image_size", "pruning.per_layer", "scale",
                     "tracking.uri", "cache.dir", "study.name", "study.storage", "launch.trial", "launch.run_id",
                     "sensitivity.amounts", "tracking.log_model"):
        assert left_out not in fixed, left_out


def test_a_runs_params_are_what_shapes_it_and_its_labels():
    from pqsweep.records import params

    trial = params(compose_cfg("quantization=static_int8"))
    assert trial["quantization.engine"] == "x86" and trial["quantization"] == "static_int8"
    assert trial["train.finetune_lr"] == "0.0001" and trial["scale"] == "cpu"
    assert not {"model.min_image_size", "quantization.export_tolerance", "tracking.uri", "cache.dir",
                "launch.run_id", "sensitivity.tolerance", "study.objectives"} & set(trial)
    baseline = params(compose_cfg(), "baseline")
    assert "train.epochs" in baseline and "train.finetune_epochs" not in baseline and "pruning.amount" not in baseline
    scan = params(compose_cfg(config_name="sensitivity"), "amounts")  # a sensitivity scan's run
    assert {"sensitivity.tolerance", "sensitivity.amounts", "sensitivity.split", "pruning.name"} <= set(scan)
    assert not {"pruning.amount", "quantization.name", "sensitivity.output"} & set(scan)


@pytest.mark.parametrize("key, late", [("quantization", True), ("quantization.bits_w", True),
                                       ("measure.repeats", True), ("export", True), ("pruning.amount", False),
                                       ("pruning", False), ("train.seed", False), ("model", False),
                                       ("train.optimizer.lr", False), ("experiment", False)])
def test_late_keys_are_those_that_change_no_stage_before_the_trial(key, late):
    assert identity.is_late(compose_cfg("quantization=fake_quant"), key) is late


# --- studies stored before the declarations resume -------------------------------------------------------------

STORED = json.loads((Path(__file__).parent / "data" / "study_identities_07a9435.json").read_text())


def stored_study(stored: dict) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="stored")
    study.set_user_attr(studies.FIXED_ATTR, stored["fixed"])
    study.set_user_attr(studies.SPACE_ATTR, stored["space"])
    return study


def current(overrides: list[str]) -> tuple[DictConfig, dict, dict]:
    cfg = compose_cfg(*overrides, hydra=True)
    grid = cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.GridSampler"
    space = spaces.build(dict(cfg.hydra.sweeper.params), [], grid, lambda key: False, "stored")
    return cfg, identity.fixed_settings(cfg, space.swept), space.stored()


@pytest.mark.parametrize("name", sorted(STORED))
def test_a_study_stored_by_07a9435_resumes_with_the_same_command(name):
    # tests/data/study_identities_07a9435.json: each sweep file's identity as the sweeper of commit 07a9435 stored it
    # (the script that wrote it is in the file's commit message)
    stored = STORED[name]
    cfg, fixed, space = current(stored["overrides"])
    studies.check_identity(stored_study(stored), cfg, fixed, space)  # raises StudyMismatch where it would not resume


def test_a_stored_study_still_refuses_a_changed_setting_and_names_it():
    stored = STORED["mnist_cnn_sparsity_x_precision@cpu"]
    cfg, fixed, space = current([*stored["overrides"], "train.epochs=3"])
    with pytest.raises(StudyMismatch, match=r"holds train.epochs=20 \(this command: 3\)"):
        studies.check_identity(stored_study(stored), cfg, fixed, space)
    changed_optimizer = {**stored, "fixed": {**stored["fixed"], "train.optimizer.momentum": "0.9"}}
    cfg, fixed, space = current(stored["overrides"])
    with pytest.raises(StudyMismatch, match=r"train.optimizer.momentum=0.9 \(this command: unset\)"):
        studies.check_identity(stored_study(changed_optimizer), cfg, fixed, space)


# --- declarations that say "shapes nothing" are true ------------------------------------------------------------

TRUTH_BASE = ("dataset=digits", "dataset.num_samples=200", "train.epochs=1", "train.finetune_epochs=1",
              "measure.warmup=0", "measure.repeats=2", "pruning=global_magnitude", "pruning.amount=0.5",
              "quantization=static_int8", "quantization.calibration_batches=1")  # changed to 2: other int8 ranges
NOT_METRICS = {"latency_ms_p50", "latency_ms_p90"}  # timings differ between any two runs


@pytest.mark.slow
def test_a_field_declared_to_shape_nothing_changes_no_result_or_is_refused(tmp_path):
    """The unsafe direction of a declaration: a field that shaped a result but said it did not would let a cache entry
    be reused for other inputs. Each such field of a small run is changed, and the run computed from scratch (a cache
    of its own) either is refused by the checks or measures what the unchanged run measures."""
    from pqsweep.checks import ConfigError

    def run(cfg, name: str) -> dict:
        cfg.cache.dir, cfg.tracking.uri = str(tmp_path / name), f"sqlite:///{tmp_path}/{name}.db"
        metrics = pipeline.run(cfg).metrics
        return {k: v for k, v in metrics.items() if k not in NOT_METRICS}

    base = compose_cfg(*TRUTH_BASE)
    reference = run(copy.deepcopy(base), "reference")
    checked = []
    for group in (*OPTION_GROUPS, *SCHEMA_GROUPS, None):
        for path, schema in fields(base, group):
            declared = declaration(schema, path.rsplit(".", 1)[-1])
            if declared.role == Role.shapes:
                continue
            cfg = copy.deepcopy(base)
            OmegaConf.update(cfg, path, changed(OmegaConf.select(cfg, path), path, tmp_path), merge=False)
            try:
                measured = run(cfg, path)
            except ConfigError:
                continue  # a fact the checks hold the run to: it cannot train with the changed value
            assert measured == reference, f"{path} is declared {declared.role.value}, yet the run changed"
            checked.append(path)
    assert {"dataset.root", "model.weights", "pruning.stored_weights", "quantization.export_tolerance", "scale",
            "launch.run_id", "tracking.log_model"} <= set(checked)


def test_a_study_that_stored_a_function_before_it_moved_resumes():
    cfg = compose_cfg("quantization=static_int8", "pruning=random", hydra=True)
    fixed = identity.fixed_settings(cfg, [])
    older = {"fixed": {**fixed, "quantization._target_": '"pqsweep.quantization.fx.static_int8"',
                       "pruning._target_": '"pqsweep.pruning.unstructured.random"'}, "space": {}}
    studies.check_identity(stored_study(older), cfg, fixed, {})


def test_the_calibration_batches_shape_the_trial():
    cfg = compose_cfg("quantization=static_int8")
    fewer = compose_cfg("quantization=static_int8", "quantization.calibration_batches=1")
    assert stage_keys(fewer)["trial"] != stage_keys(cfg)["trial"]
    assert identity.params(cfg)["quantization.calibration_batches"] == "8"


def test_a_field_added_since_a_study_was_stored_counts_as_its_default():
    # a study stored before train.batch_size existed ran with what its default does now
    stored = STORED["mnist_cnn_sparsity_x_precision@cpu"]
    older = {**stored, "fixed": {k: v for k, v in stored["fixed"].items() if k != "train.batch_size"}}
    cfg, fixed, space = current(stored["overrides"])
    studies.check_identity(stored_study(older), cfg, fixed, space)
    cfg, fixed, space = current([*stored["overrides"], "train.batch_size=32"])
    with pytest.raises(StudyMismatch, match=r"holds train.batch_size=unset \(this command: 32\)"):
        studies.check_identity(stored_study(older), cfg, fixed, space)


STAGE_KEYS = json.loads((Path(__file__).parent / "data" / "stage_keys_ea31a70.json").read_text())


@pytest.mark.parametrize("overrides", list(STAGE_KEYS))
def test_fields_added_at_their_default_leave_every_cache_entry_valid(overrides):
    # tests/data/stage_keys_ea31a70.json: the keys before train.distill, train.bn_batches and pruning.importance
    # existed. A field declared added=True enters no key at its default, so the cache entries of older runs still hit.
    cfg = compose_cfg(*([] if overrides == "(defaults)" else overrides.split()))
    keys, stored = stage_keys(cfg), STAGE_KEYS[overrides]
    assert {name: keys[name] for name in stored} == stored
    assert all(keys[name] is None for name in keys.keys() - stored.keys())  # a stage added since: off at defaults


@pytest.mark.parametrize("override, stage", [("train.distill.enabled=true", "prune"), ("train.bn_batches=8", "prune"),
                                             ("pruning.importance=taylor", "prune")])
def test_an_added_field_off_its_default_enters_its_stages_keys(override, stage):
    base = compose_cfg("pruning=l1_filter")
    assert stage_keys(compose_cfg("pruning=l1_filter", override))[stage] != stage_keys(base)[stage]
