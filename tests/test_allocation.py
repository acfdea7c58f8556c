"""Per-layer allocation as a search (pqsweep.allocation, pqsweep.allocate): a swept per-layer field is one param per
prunable layer, each trial's values reach the layers they name, the budget is kept, the sensitivity allocations run
first, and a budget no allocation reaches or a model with no layer to allocate over is refused in one line."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from nets import compose_cfg, context, experiment_ids, loader
from optuna.distributions import CategoricalDistribution
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from torch import nn

from pqsweep import allocate, allocation, measure, models
from pqsweep.identity import stage_keys
from pqsweep.pruning import prune
from pqsweep.quantization.fake_quant import fake_quant
from pqsweep.sweeper.space import Space, StudyMismatch

CNN_LAYERS = ["0", "3", "8", "10"]  # models.small_cnn's Conv2d, Conv2d, Linear, Linear
SPARSITY, BITS = "pruning.layer_sparsity", "quantization.layer_bits"
AXES = [f"{SPARSITY}=choice(0.0,0.5,0.9)", f"{BITS}=choice(2,4,8,32)"]
TINY = ["model=cnn", "dataset=digits", "train.epochs=1", "train.finetune_epochs=1", "measure.warmup=1",
        "measure.repeats=2", "measure.top5=false", "pruning=layer_magnitude", "quantization=fake_quant",
        "hydra/sweeper=pqsweep", "hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.population_size=4",
        "study.objectives=[top1,size_theoretical_mb]", "study.name=alloc"]


def a_space(*keys: str, grid: bool = False) -> Space:
    return Space(grid, {key: CategoricalDistribution(choices) for key, choices in
                        {SPARSITY: (0.0, 0.5, 0.9), BITS: (2, 4, 8, 32), "train.seed": (0, 1)}.items() if key in keys})


# -- the space: pure, no model trained -----------------------------------------------------------------------------


def test_a_swept_per_layer_field_is_one_param_per_layer_and_goes_back_as_one_mapping():
    cfg = compose_cfg("pruning=layer_magnitude", "quantization=fake_quant")
    space = allocation.expand(a_space(SPARSITY, BITS, "train.seed"), cfg, CNN_LAYERS)
    assert space.swept == ["pruning.layer_sparsity/0", "pruning.layer_sparsity/3", "pruning.layer_sparsity/8",
                           "pruning.layer_sparsity/10", "quantization.layer_bits/0", "quantization.layer_bits/3",
                           "quantization.layer_bits/8", "quantization.layer_bits/10", "train.seed"]
    params = {**{f"{SPARSITY}/{layer}": s for layer, s in zip(CNN_LAYERS, (0.0, 0.5, 0.9, 0.5))},
              **{f"{BITS}/{layer}": b for layer, b in zip(CNN_LAYERS, (2, 4, 8, 32))}, "train.seed": 1}
    overrides = space.assignments(params)
    assert overrides == ("train.seed=1", "++pruning.layer_sparsity={0:0.0,3:0.5,8:0.9,10:0.5}",
                         "++quantization.layer_bits={0:2,3:4,8:8,10:32}")
    trial = compose_cfg("pruning=layer_magnitude", "quantization=fake_quant", *overrides)
    assert {str(k): v for k, v in trial.pruning.layer_sparsity.items()} == {"0": 0.0, "3": 0.5, "8": 0.9, "10": 0.5}
    assert {str(k): v for k, v in trial.quantization.layer_bits.items()} == {"0": 2, "3": 4, "8": 8, "10": 32}


def test_per_layer_sparsity_shapes_the_prune_stage_and_per_layer_bits_only_the_trial():
    base = ["pruning=layer_magnitude", "quantization=fake_quant"]
    plain = stage_keys(compose_cfg(*base))
    sparse = stage_keys(compose_cfg(*base, "++pruning.layer_sparsity={0:0.5}"))
    bits = stage_keys(compose_cfg(*base, "++quantization.layer_bits={0:4}"))
    assert sparse["prune"] != plain["prune"] and sparse["baseline"] == plain["baseline"]
    assert bits["prune"] == plain["prune"] and bits["trial"] != plain["trial"]


def test_a_per_layer_field_in_a_grid_or_over_a_model_without_layers_is_refused_in_one_line():
    cfg = compose_cfg("pruning=layer_magnitude")
    with pytest.raises(StudyMismatch, match=r"^pruning.layer_sparsity=choice\(0.0,0.5,0.9\) is not allowed: must be "
                                            r"swept by a search sampler"):
        allocation.expand(a_space(SPARSITY, grid=True), cfg, CNN_LAYERS)
    with pytest.raises(StudyMismatch, match=r"^pruning.layer_sparsity=choice\(0.0,0.5,0.9\) is not allowed: must be "
                                            r"swept over a model with a prunable layer .* model=cnn has none$"):
        allocation.expand(a_space(SPARSITY), cfg, allocation.layer_names(nn.Sequential(nn.Flatten(), nn.ReLU())))


def test_the_greedy_allocation_compresses_the_insensitive_layer_first_and_fits_its_budget():
    counts = {"a": 1000, "b": 1000}
    steps = {SPARSITY: [0.0, 0.5, 0.9], BITS: [32, 8, 4]}
    rise = {(SPARSITY, "a", 0.5): 0.0, (SPARSITY, "a", 0.9): 0.01, (SPARSITY, "b", 0.5): 1.0,
            (SPARSITY, "b", 0.9): 3.0, (BITS, "a", 8): 0.0, (BITS, "a", 4): 0.0, (BITS, "b", 8): 0.5,
            (BITS, "b", 4): 2.0}
    full = 2 * 1000 * 4.0
    chosen = allocate.choose(rise, steps, counts, {}, full, 0.5 * full)
    assert chosen[SPARSITY]["a"] == 0.9 and chosen[SPARSITY]["b"] == 0.0  # b, the sensitive one, kept whole
    size = sum(allocate.layer_bytes(counts[l], chosen[SPARSITY][l], chosen[BITS][l]) for l in counts)
    assert size <= 0.5 * full
    assert allocate.choose(rise, steps, counts, {}, full, 10.0) is None  # below the most compressed: none


# -- the settings reach the layers ---------------------------------------------------------------------------------


def test_a_layer_at_2_bits_has_at_most_4_weight_values_and_a_32_bit_layer_stays_float(trained_cnn, digits):
    cfg = compose_cfg("quantization=fake_quant", "quantization.granularity=per_tensor",
                      "++quantization.layer_bits={0:2,3:32,8:4}").quantization
    deployed = fake_quant(copy.deepcopy(trained_cnn), cfg, context(loader(digits.train, 64)))
    weights = {name: m.weight for name, m in deployed.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(torch.unique(weights["0.layer"])) <= 4  # symmetric 2 bits: {-s, 0, s}
    assert len(torch.unique(weights["8.layer"])) <= 16
    assert len(torch.unique(weights["10.layer"])) > 16  # bits_w=8 where layer_bits does not say
    assert torch.equal(weights["3"], trained_cnn[3].weight)  # float: not rounded, its input not quantized
    nonzero = {k: int(torch.count_nonzero(w)) for k, w in weights.items()}
    biases = sum(int(torch.count_nonzero(trained_cnn[int(k)].bias)) for k in CNN_LAYERS) * 4
    expected = nonzero["0.layer"] * 2 / 8 + nonzero["3"] * 4 + nonzero["8.layer"] * 4 / 8 + nonzero["10.layer"]
    assert measure.sizes(deployed)["size_theoretical_mb"] * 1e6 == pytest.approx(expected + biases)


def test_a_layer_at_sparsity_s_has_that_share_of_zeros(trained_cnn):
    cfg = compose_cfg("pruning=layer_magnitude", "pruning.amount=0.0",
                      "++pruning.layer_sparsity={0:0.5,3:0.25,8:0.9}").pruning
    pruned = prune(copy.deepcopy(trained_cnn), cfg, None)
    for layer, share in {"0": 0.5, "3": 0.25, "8": 0.9, "10": 0.0}.items():
        weight = pruned[int(layer)].weight
        assert (weight == 0).sum().item() == round(share * weight.numel()), layer


# -- a real sweep: subprocess, Optuna journal, MLflow sqlite ------------------------------------------------------


def command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pqsweep.cli", "-m", *TINY, *args,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache"]


def study(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    return optuna.load_study(study_name="alloc", storage=storage)


@pytest.mark.slow
def test_an_allocation_sweep_keeps_its_budget_starts_from_the_sensitivity_allocations_and_resumes(tmp_path):
    fp32 = measure.sizes(models.small_cnn(num_classes=10, in_channels=1))["size_theoretical_mb"]
    budget = 0.25 * fp32
    args = [*AXES, "hydra.sweeper.n_trials=3", "study.allocations=[0.25,0.125]",
            f'study.constraints=["size_theoretical_mb<={budget:.6f}"]']
    done = subprocess.run(command(tmp_path, *args), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study(tmp_path).trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    # the sensitivity allocations are the first trials, one per budget, each inside its budget
    assert [t.user_attrs.get(allocate.ALLOCATION_ATTR) for t in trials] == ["sensitivity@0.25",
                                                                            "sensitivity@0.125", None]
    assert trials[0].values[1] <= budget and trials[1].values[1] <= 0.125 * fp32
    assert all(v <= 0 for t in trials[:2] for v in t.constraints.values())  # Optuna's: <= 0 is within
    assert set(trials[2].params) == {f"{key}/{layer}" for key in (SPARSITY, BITS) for layer in CNN_LAYERS}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = MlflowClient().search_runs(experiment_ids(MlflowClient()), "tags.stage = 'trial'")
    by_number = {int(r.data.tags["optuna_trial_number"]): r for r in runs}
    for t in trials:  # each run was composed with its trial's per-layer values, and measured what it was told
        logged = by_number[t.number].data.params
        for layer in CNN_LAYERS:
            assert float(logged[f"{SPARSITY}.{layer}"]) == pytest.approx(t.params[f"{SPARSITY}/{layer}"])
            assert int(logged[f"{BITS}.{layer}"]) == t.params[f"{BITS}/{layer}"]
        assert t.values[1] == pytest.approx(by_number[t.number].data.metrics["size_theoretical_mb"])
    # the sweeper trained the baseline to measure the sensitivities: every trial loaded it
    assert {r.data.tags["baseline_cached"] for r in runs} == {"true"}
    # the same command resumes: the stored space is the expanded one, and nothing is left to run
    again = subprocess.run(command(tmp_path, *args), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(study(tmp_path).trials) == 3
    # another per-layer space is another study
    other = [f"{SPARSITY}=choice(0.0,0.75)", AXES[1], *args[2:]]
    refused = subprocess.run(command(tmp_path, *other), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "study alloc searches" in refused.stderr.splitlines()[-1]


def test_a_budget_no_allocation_reaches_is_refused_in_one_line_before_anything_is_written(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(command(work, *AXES, "hydra.sweeper.n_trials=2",
                                  'study.constraints=["size_theoretical_mb<=0.0001"]'),
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("pqsweep: error: study.constraints=size_theoretical_mb<=0.0001 is not allowed: must be "
                           "at least 0.00"), line
    assert "every layer at layer_sparsity=0.9, layer_bits=2" in line
    assert list(work.iterdir()) == []  # no store, no cache, no outputs: nothing trained
