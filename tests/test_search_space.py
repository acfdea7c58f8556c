"""What a sweep searches, without a store: the space of a sweep file and a command line, a grid's points in the order
they run, which points are done, queued again or left for the next command, and the keys only some options have.
(The subprocess sweeps in test_study.py and test_search.py run the same through the real stores.)"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial

from pqsweep import identity
from pqsweep.sweeper import space as spaces
from pqsweep.sweeper.space import Space, StudyMismatch

from nets import compose_cfg

FILE = {"pruning.amount": "0,0.5,0.9", "quantization": "none,fp16,static_int8"}
LATE = {"quantization", "quantization.bits_w"}  # what identity.is_late answers for these keys (tested there)


def grid(*arguments: str, params=FILE) -> Space:
    return spaces.build(params, list(arguments), True, lambda key: key in LATE, "s")


def test_a_sweep_files_grid_runs_every_point_with_the_late_keys_varying_fastest():
    space = grid()
    assert space.points()[:4] == [{"pruning.amount": 0, "quantization": "none"},
                                  {"pruning.amount": 0, "quantization": "fp16"},
                                  {"pruning.amount": 0, "quantization": "static_int8"},
                                  {"pruning.amount": 0.5, "quantization": "none"}]
    assert len(space.points()) == 9 and space.overrides == ()
    late_first = spaces.build({"quantization": "none,fp16", "pruning.amount": "0,0.5"}, [], True,
                              lambda key: key in LATE, "s")
    assert list(late_first.choices) == ["pruning.amount", "quantization"]  # reordered: a prune stage shared in turn


def test_the_command_line_narrows_a_grid_within_its_study_and_refuses_a_value_outside_it():
    narrowed = grid("pruning.amount=0.5,0.9", "quantization=fp16")
    assert narrowed.choices == {"pruning.amount": [0.5, 0.9], "quantization": ["fp16"]}
    assert narrowed.stored() == grid().stored()  # the same study: it searches the file's space
    assert grid("pruning.amount=0.0").choices["pruning.amount"] == [0]  # the grid's own value: 0 and 0.0 are one
    with pytest.raises(StudyMismatch, match=r"^pruning.amount=0.3 is not in the grid of study s \(0, 0.5, 0.9\)"):
        grid("pruning.amount=0.3")


def test_a_key_the_file_does_not_sweep_joins_the_space_and_fixed_values_are_every_trials_overrides():
    space = grid("train.seed=0,1", "train.epochs=3", "~measure.top5")
    assert space.swept == ["pruning.amount", "quantization", "train.seed"]
    assert len(space.points()) == 18 and space.overrides == ("train.epochs=3", "~measure.top5")
    assert space.stored() != grid().stored()  # another space: another study


def test_a_grid_without_swept_keys_or_with_a_continuous_one_is_refused():
    with pytest.raises(StudyMismatch, match="a grid sweep needs swept keys"):
        spaces.build({}, ["train.epochs=3"], True, lambda key: False, "s")
    with pytest.raises(StudyMismatch, match="a grid takes discrete values"):
        grid("train.optimizer.lr=interval(0.001,0.1)")


def test_a_budgeted_search_takes_the_command_lines_value_for_a_key_the_file_sweeps():
    params = {"pruning.amount": "interval(0,0.9)", "quantization": "none,fp16"}
    space = spaces.build(params, ["quantization=fp16"], False, lambda key: False, "s")
    assert list(space.distributions) == ["pruning.amount"] and space.overrides == ("quantization=fp16",)
    assert isinstance(space.distributions["pruning.amount"], FloatDistribution) and space.choices == {}


def test_discrete_distributions_become_their_grid_values():
    assert spaces.grid_choices(IntDistribution(1, 7, step=3)) == [1, 4, 7]
    assert spaces.grid_choices(FloatDistribution(0.0, 0.5, step=0.25)) == [0.0, 0.25, 0.5]
    assert spaces.grid_choices(CategoricalDistribution(["a", 1])) == ["a", 1]


# --- a grid's bookkeeping across runs -----------------------------------------------------------------------------

def test_a_resumed_grid_runs_only_the_points_without_a_complete_trial():
    space = grid()
    complete = [{"pruning.amount": 0.0, "quantization": "none"}, {"pruning.amount": 0.5, "quantization": "fp16"}]
    todo = spaces.remaining(space, complete)
    assert len(todo) == 7 and {"pruning.amount": 0, "quantization": "none"} not in todo
    assert spaces.plan(space, complete, n_trials=0) == "9 grid points, 2 done, 7 to run"
    assert spaces.remaining(space, space.points()) == []  # a finished grid runs nothing


def test_points_running_queued_or_tried_by_this_run_are_not_queued_again():
    space = grid("pruning.amount=0", "quantization=none,fp16,static_int8")
    running = [{"pruning.amount": 0, "quantization": "none"}]  # another worker's, or this run's in flight
    tried = {space.key({"pruning.amount": 0, "quantization": "fp16"})}  # failed in this run: it waits for the next
    assert spaces.to_enqueue(space, running, tried) == [{"pruning.amount": 0, "quantization": "static_int8"}]
    assert spaces.to_enqueue(space, running, set()) == [{"pruning.amount": 0, "quantization": "fp16"},
                                                       {"pruning.amount": 0, "quantization": "static_int8"}]


def test_a_trial_for_a_point_another_worker_took_runs_nothing():
    space = grid()
    point = {"pruning.amount": 0.5, "quantization": "fp16"}
    assert spaces.taken_by_another(space, point, [{"pruning.amount": 0.5, "quantization": "fp16"}])
    assert not spaces.taken_by_another(space, point, [{"pruning.amount": 0.5, "quantization": "none"}])
    assert spaces.taken_by_another(space, None, [])  # not from the queue: a budgeted sampler's trial in a grid


def test_a_budgeted_plan_counts_complete_trials_against_n_trials():
    space = spaces.build({"pruning.amount": "interval(0,0.9)"}, [], False, lambda key: False, "s")
    assert spaces.plan(space, [{}, {}], n_trials=5) == "2 of n_trials=5 trials done"


# --- keys only some options of a swept group have ----------------------------------------------------------------

MIXED = {"quantization": "none,fake_quant", "quantization.bits_w": "choice(2,4,8)",
         "pruning.amount": "interval(0,0.9)"}


def composed(overrides: list[str]):
    return compose_cfg(*overrides)


def test_a_key_only_some_options_have_is_suggested_only_with_them():
    space = spaces.build(MIXED, [], False, lambda key: key in LATE, "s")
    space, said = spaces.with_conditions(space, composed)
    assert space.conditions == {"quantization.bits_w": ("quantization", ["fake_quant"])}
    assert said == ["quantization.bits_w is suggested only with quantization=fake_quant"]
    assert list(space.distributions)[-1] == "quantization.bits_w"  # after its group, which decides it
    with_bits = {"quantization": "fake_quant", "quantization.bits_w": 4, "pruning.amount": 0.5}
    assert space.suggest(FixedTrial(with_bits)) == with_bits
    assert space.suggest(FixedTrial({"quantization": "none", "pruning.amount": 0.5})) == {
        "quantization": "none", "pruning.amount": 0.5}


def test_a_key_no_option_of_its_group_has_is_refused():
    space = spaces.build({"quantization": "none,fp16", "quantization.bits_w": "choice(2,4)"}, [], False,
                         lambda key: False, "s")
    with pytest.raises(StudyMismatch, match=r"^quantization.bits_w: no option of quantization \(none, fp16\) has it"):
        spaces.with_conditions(space, composed)


def test_a_grid_has_no_conditional_keys_and_composes_nothing():
    space, said = spaces.with_conditions(grid(), lambda overrides: pytest.fail("composed"))
    assert space.conditions == {} and said == []


def test_the_sweeper_orders_by_the_declarations_late_keys():
    cfg = compose_cfg("quantization=fake_quant")
    space = spaces.build({"quantization.bits_w": "4,8", "train.seed": "0,1", "pruning.amount": "0,0.5"}, [], True,
                         lambda key: identity.is_late(cfg, key), "s")
    assert list(space.choices) == ["train.seed", "pruning.amount", "quantization.bits_w"]
    assert OmegaConf.select(cfg, "quantization.bits_w") == 8


# --- what a trial's task returned ---------------------------------------------------------------------------------

def test_a_task_that_returned_its_error_fails_with_that_error_and_one_with_its_objectives_completes():
    from hydra.core.utils import JobReturn, JobStatus

    from pqsweep.sweeper.loop import Loop

    def returned(value):
        return Loop.outcome_of(JobReturn(status=JobStatus.COMPLETED, _return_value=value), ["top1", "size_mb"])

    assert returned({"error": "ValueError: no layer conv9"}) == (None, "ValueError: no layer conv9")
    assert returned({"top1": 90.0, "size_mb": 0.1, "macs": 5.0}) == ({"top1": 90.0, "size_mb": 0.1, "macs": 5.0}, "")
    assert returned({"top1": float("nan"), "size_mb": 0.1})[1].startswith("the task returned no top1")
    raised = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("shapes do not match\nmore"))
    assert Loop.outcome_of(raised, ["top1"]) == (None, "RuntimeError: shapes do not match")


def test_study_seeds_adds_train_seed_as_the_slowest_axis_from_the_configured_seed():
    space = spaces.with_seeds(grid("train.seed=3", "train.epochs=2"), 3, 2)
    assert space.choices["train.seed"] == [3, 4] and list(space.choices)[0] == "train.seed"
    assert space.overrides == ("train.epochs=2",)  # the first seed given on the command line is the points' own
    points = space.points()
    assert len(points) == 18 and {p["train.seed"] for p in points[:9]} == {3}  # a seed's points run together
    assert spaces.with_seeds(grid(), 0, 1) == grid()  # one seed: the grid as it was, and the study as it was stored
    assert "train.seed" in space.stored()  # a resumed study must ask for the same seeds


def test_study_seeds_is_refused_for_a_search_and_beside_a_swept_train_seed():
    search = spaces.build(FILE, [], False, lambda key: False, "s")
    with pytest.raises(StudyMismatch, match=r"^study.seeds=3 is not allowed: must be 1 with a search sampler"):
        spaces.with_seeds(search, 0, 3)
    with pytest.raises(StudyMismatch, match=r"^study.seeds=2 is not allowed: must be 1 where train.seed is swept"):
        spaces.with_seeds(grid("train.seed=0,1"), 0, 2)
