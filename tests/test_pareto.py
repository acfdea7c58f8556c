"""reports.pareto: fronts with known dominance in mixed directions, Optuna's best_trials on real studies, a
hypervolume worked by hand, reference points, budgets, and the parsers' one-line errors."""

from __future__ import annotations

import math
import random

import optuna
import pytest

from pqsweep.reports.pareto import (Bound, Objective, constraint_values, hypervolume, parse_bounds, parse_objectives,
                                    pareto_front, reference_point, within_budget)

NAN = float("nan")
TOP1 = Objective("top1", "maximize")
SIZE = Objective("size_mb", "minimize")
LATENCY = Objective("latency_ms_p50", "minimize")


def test_front_2d_mixed_directions_ties_and_missing_rows():
    rows = [
        [90.0, 2.0],  # 0: on the front
        [80.0, 1.0],  # 1: on the front (smaller, less accurate)
        [85.0, 3.0],  # 2: dominated by 0 (less accurate and bigger); a front that minimised top1 would keep it
        [90.0, 2.0],  # 3: identical to 0, so neither dominates the other: both on the front
        [95.0, 5.0],  # 4: on the front (most accurate)
        [NAN, 0.1],   # 5: would be the smallest, but a NaN is never on the front
        None,         # 6: a failed run
        [80.0, 1.5],  # 7: dominated by 1 only (equal top1, bigger)
        [None, 0.5],  # 8: a missing value, like NaN
    ]
    assert pareto_front(rows, [TOP1, SIZE]) == [True, True, False, True, True, False, False, False, False]


def test_missing_rows_dominate_nothing():
    # Row 1 would dominate row 0 in size and tie in the other coordinate if its NaN were read as anything at all.
    assert pareto_front([[90.0, 2.0], [NAN, 1.0], None], [TOP1, SIZE]) == [True, False, False]


def test_front_3d_mixed_directions():
    rows = [
        [90.0, 2.0, 5.0],  # 0: on the front
        [90.0, 2.0, 4.0],  # 1: dominates 0 (faster, equal elsewhere): 0 is off, 1 on
        [92.0, 3.0, 6.0],  # 2: on the front (most accurate)
        [89.0, 2.0, 4.0],  # 3: dominated by 1 (less accurate, equal elsewhere)
        [70.0, 0.5, 9.0],  # 4: on the front (smallest)
        [92.0, 3.0, 6.0],  # 5: identical to 2: on the front too
        [91.0, 3.5, 6.0],  # 6: dominated by 2
    ]
    assert pareto_front(rows, [TOP1, SIZE, LATENCY]) == [False, True, True, False, True, True, False]
    # The same rows with latency maximised: row 0 now beats row 1 and row 3 is no longer dominated by 1.
    assert pareto_front(rows, [TOP1, SIZE, Objective("latency_ms_p50", "maximize")]) == \
        [True, False, True, False, True, True, False]


def test_front_rejects_a_row_of_the_wrong_length():
    with pytest.raises(ValueError, match="a row has 3 values for 2 objectives"):
        pareto_front([[1.0, 2.0, 3.0]], [TOP1, SIZE])


@pytest.mark.parametrize("directions", [["maximize", "minimize"], ["minimize", "minimize", "maximize"]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_front_matches_optuna_best_trials(directions, seed):
    rng = random.Random(seed)
    objectives = [Objective(f"m{i}", d) for i, d in enumerate(directions)]
    sign = [-1.0 if d == "maximize" else 1.0 for d in directions]  # value = sign * loss

    def draw() -> list[float]:
        # Losses on a coarse grid, the first two traded against each other (so the front has many rows), the
        # rest random: ties within a coordinate and whole duplicate rows are common.
        u = rng.randint(0, 6)
        losses = [u, 6 - u + rng.randint(0, 2)] + [rng.randint(0, 3) for _ in directions[2:]]
        return [s * loss for s, loss in zip(sign, losses)]

    rows: list[list[float] | None] = [draw() for _ in range(40)]
    rows += [list(row) for row in rows[:10]] + [None]  # exact copies of ten rows, and a run with no values
    study = optuna.create_study(directions=directions)
    for row in rows:
        if row is None:  # a run that produced no values is a FAIL trial, which best_trials leaves out
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
        else:
            study.add_trial(optuna.trial.create_trial(values=row))
    mask = pareto_front(rows, objectives)
    ours = {number for number, on in enumerate(mask) if on}
    assert ours == {t.number for t in study.best_trials}
    # Not trivially all or nothing, and some row is on the front together with its copy.
    assert 1 < len(ours) < len(rows) and any(mask[i] and mask[40 + i] for i in range(10))


def test_hypervolume_by_hand_2d():
    # top1 maximised, size minimised, reference (top1 70, size 4). The box each point dominates:
    #   (90, 2): top1 70..90 x size 2..4 = 20 * 2 = 40
    #   (80, 1): top1 70..80 x size 1..4 = 10 * 3 = 30
    #   overlap:  top1 70..80 x size 2..4 = 10 * 2 = 20      -> union 40 + 30 - 20 = 50
    # (95, 5) is bigger than the reference's 4 MB: outside the box, nothing; (85, 3) lies inside (90, 2)'s box.
    # (75, 4) is level with the reference's size: no volume, and dropped like the point outside.
    points = [[90.0, 2.0], [80.0, 1.0], [95.0, 5.0], [85.0, 3.0], [75.0, 4.0], [NAN, 0.5]]
    assert hypervolume(points, [TOP1, SIZE], [70.0, 4.0]) == pytest.approx(50.0)


def test_hypervolume_3d_and_empty():
    # One point, top1 90 vs 80, size 1 vs 3, latency 2 vs 5: 10 * 2 * 3 = 60.
    assert hypervolume([[90.0, 1.0, 2.0]], [TOP1, SIZE, LATENCY], [80.0, 3.0, 5.0]) == pytest.approx(60.0)
    assert hypervolume([], [TOP1, SIZE], [70.0, 4.0]) == 0.0
    assert hypervolume([[60.0, 1.0]], [TOP1, SIZE], [70.0, 4.0]) == 0.0  # less accurate than the reference


def test_reference_from_a_baseline_better_than_every_trial():
    rows = [{"top1": 90.1, "size_mb": 0.02}, {"top1": 95.0, "size_mb": 0.01}]
    baseline = {"top1": 99.0, "size_mb": 0.0766}
    reference, text = reference_point([TOP1, SIZE], baseline, rows)
    assert reference == [90.1, 0.0766]
    assert text == "reference: top1=90.1 (worst trial), size_mb=0.0766 (baseline)"
    # The trials then span a box: the one at 95 % and 0.01 MB dominates (95 - 90.1) x (0.0766 - 0.01).
    assert hypervolume([[r["top1"], r["size_mb"]] for r in rows], [TOP1, SIZE], reference) == \
        pytest.approx((95.0 - 90.1) * (0.0766 - 0.01))


def test_reference_uses_a_baseline_level_with_the_worst_trial():
    rows = [{"top1": 90.0, "size_mb": 0.02}, {"top1": 95.0, "size_mb": 0.05}]
    assert reference_point([TOP1, SIZE], {"top1": 90.0, "size_mb": 0.05}, rows) == \
        ([90.0, 0.05], "reference: top1=90 (baseline), size_mb=0.05 (baseline)")


def test_reference_without_a_baseline_is_the_worst_complete_row():
    rows = [{"top1": 90.0, "size_mb": 0.02}, {"top1": 95.0, "size_mb": 0.05},
            {"top1": NAN, "size_mb": 9.0}, {"size_mb": 8.0}]  # incomplete rows: not trials the volume counts
    assert reference_point([TOP1, SIZE], None, rows) == \
        ([90.0, 0.05], "reference: top1=90 (worst trial), size_mb=0.05 (worst trial)")
    with pytest.raises(ValueError, match="no trial has every objective and the baseline has no top1"):
        reference_point([TOP1, SIZE], None, rows[2:])


def test_parse_objectives():
    assert parse_objectives("top1:max, size_mb:min,latency_ms_p50", default=["top1"]) == [TOP1, SIZE, LATENCY]
    assert parse_objectives(None, default=["top1", "size_mb"]) == [TOP1, SIZE]
    assert parse_objectives("size_mb:max", default=[]) == [Objective("size_mb", "maximize")]  # the suffix wins
    assert parse_objectives("my_metric:min", default=[]) == [Objective("my_metric", "minimize")]


@pytest.mark.parametrize("text, message", [
    ("foo:up", "objective 'foo:up': direction must be max or min"),
    ("top1,bar", "objective 'bar' has no known direction; write bar:max or bar:min"),
    ("latency_threads", "objective 'latency_threads' has no known direction; write latency_threads:max or "
                        "latency_threads:min"),  # a setting recorded as a metric: METRICS gives it no direction
    (":max", "objective ':max': the metric name is empty"),
    ("top1,top1:max", "objective 'top1' is given twice"),
    (" , ", "objectives: none given; write e.g. top1:max,size_mb:min"),
])
def test_parse_objectives_rejects(text, message):
    with pytest.raises(ValueError) as error:
        parse_objectives(text, default=["top1"])
    assert str(error.value) == message


def test_parse_bounds():
    assert parse_bounds("top1_delta>=-1,size_mb<=0.05") == [Bound("top1_delta", ">=", -1.0),
                                                            Bound("size_mb", "<=", 0.05)]
    assert parse_bounds(" latency_ms_p50 < 2.5 , sparsity>0.5,") == [Bound("latency_ms_p50", "<", 2.5),
                                                                      Bound("sparsity", ">", 0.5)]
    assert parse_bounds(None) == [] and parse_bounds("") == []


@pytest.mark.parametrize("item", ["size_mb=0.05", "size_mb<=abc", ">=1", "size_mb<=nan", "size_mb=<1", "top1>=1 2"])
def test_parse_bounds_rejects(item):
    with pytest.raises(ValueError) as error:
        parse_bounds(f"top1>=90,{item}")
    assert str(error.value) == \
        f"bound {item!r}: write METRIC OP NUMBER with OP one of >=, <=, >, < (e.g. top1_delta>=-1)"


def test_bound_holds():
    assert Bound("m", ">=", 1.0).holds(1.0) and not Bound("m", ">", 1.0).holds(1.0)
    assert Bound("m", "<=", 1.0).holds(1.0) and not Bound("m", "<", 1.0).holds(1.0)
    assert Bound("m", ">", 1.0).holds(1.5) and not Bound("m", "<", 1.0).holds(1.5)
    assert not Bound("m", ">=", 1.0).holds(None) and not Bound("m", "<=", 1.0).holds(NAN)
    with pytest.raises(ValueError, match="op must be one of"):
        Bound("m", "==", 1.0)


def test_within_budget():
    rows = [
        {"method": "l1", "top1_delta": -0.5, "size_mb": 0.04},
        {"method": "random", "top1_delta": -3.0, "size_mb": 0.01},  # in size, out of accuracy
        {"method": "l1", "top1_delta": -0.8, "size_mb": 0.03},      # the answer for l1
        {"method": "l1", "top1_delta": -2.0, "size_mb": 0.01},      # smaller still, but out of accuracy
        {"method": "random", "top1_delta": 0.0, "size_mb": 0.06},   # accurate, out of size
        {"method": "l1", "size_mb": 0.001},                         # no top1_delta: never in budget
        {"method": "magnitude", "top1_delta": -0.1, "size_mb": 0.02},
        {"method": "magnitude", "top1_delta": -0.2, "size_mb": 0.02},  # a tie: the lower index stays
        {"method": "magnitude", "top1_delta": 0.0, "size_mb": NAN},    # no size: cannot be most compressed
    ]
    bounds = parse_bounds("top1_delta>=-1,size_mb<=0.05")
    assert within_budget(rows, bounds, "method", SIZE) == {"l1": 2, "random": None, "magnitude": 6}
    # With no bounds every row is in budget and the smallest wins.
    assert within_budget(rows, [], "method", SIZE) == {"l1": 5, "random": 1, "magnitude": 6}


def test_constraint_values():
    bounds = parse_bounds("size_mb<=0.05,top1_delta>=-1,latency_ms_p50<2,sparsity>0.5")
    values = constraint_values({"size_mb": 0.04, "top1_delta": -1.5, "latency_ms_p50": 2.0, "sparsity": NAN}, bounds)
    # size within (-0.01), accuracy out by 0.5, latency at a strict limit (0, feasible), NaN sparsity (inf).
    assert values == [pytest.approx(-0.01), pytest.approx(0.5), 0.0, math.inf]
    assert constraint_values({}, bounds[:1]) == [math.inf]
    # Off the limits, Optuna's feasibility (every value <= 0) agrees with the bounds themselves.
    for metrics in ({"size_mb": 0.01, "top1_delta": 0.3}, {"size_mb": 0.07, "top1_delta": 0.3},
                    {"size_mb": 0.01, "top1_delta": -4.0}):
        assert all(c <= 0 for c in constraint_values(metrics, bounds[:2])) == \
            all(b.holds(metrics.get(b.metric)) for b in bounds[:2])
    # And Optuna takes the values: an infinite constraint is stored, NaN is what it refuses.
    trial = optuna.trial.create_trial(values=[1.0])
    for i, c in enumerate(values):
        trial.set_constraint(str(i), c)
    assert trial.constraints["3"] == math.inf
