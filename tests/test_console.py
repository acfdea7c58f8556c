"""What a sweep prints to a person: plural forms, bars that stay out of logs, and the estimate of the time left."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from pqsweep import console, identity
from pqsweep.estimate import Ended, remaining, stage_seconds

GRID = [{"pruning.amount": a, "quantization": q} for a in (0, 0.5, 0.9) for q in ("none", "fp16", "static_int8")]
SHAPED_BY = {"data": (), "baseline": (), "baseline_metrics": (), "prune": ("pruning.amount",)}


@pytest.mark.parametrize("count, noun, said", [(1, "epoch", "1 epoch"), (0, "epoch", "0 epochs"),
                                               (2, "trial", "2 trials"), (1, "grid point", "1 grid point"),
                                               (3, "entry", "3 entries"), (2, "batch", "2 batches")])
def test_a_count_takes_the_form_its_number_asks_for(count, noun, said):
    assert console.plural(count, noun) == said


def test_hydras_launch_line_says_one_job_in_the_singular():
    stream = io.StringIO()
    logger = logging.getLogger(console.OneJob.LOGGERS[0])
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        console.say_launches_right()
        console.say_launches_right()  # installed once
        logger.warning("Launching %d jobs locally", 1)
        logger.warning(f"Launching {2} jobs locally")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["Launching 1 job locally", "Launching 2 jobs locally"]
    assert sum(isinstance(f, console.OneJob) for f in logger.filters) == 1


def test_no_bar_is_drawn_where_stderr_is_no_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    drawn = io.StringIO()
    with console.bar(range(3), desc="finetune", unit="epoch", file=drawn) as progress:
        assert list(progress) == [0, 1, 2]
    assert drawn.getvalue() == ""
    monkeypatch.setenv("TQDM_DISABLE", "0")  # asked for: drawn anyway
    with console.bar(range(3), desc="finetune", unit="epoch", file=drawn) as progress:
        list(progress)
    assert "finetune" in drawn.getvalue()


def test_a_log_line_while_a_bar_is_drawn_lands_on_its_own_line(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    handler = logging.StreamHandler(sys.stderr)  # as Hydra's console handler, on the root logger
    monkeypatch.setattr(logging.root, "handlers", [handler])
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with console.bar(range(2), desc="finetune", unit="epoch") as progress:
        for _ in progress:
            logging.getLogger("pqsweep.test").warning("a log line")
    lines = screen.getvalue().replace("\r", "\n").splitlines()
    assert lines.count("a log line") == 2  # whole lines, no bar text glued to them
    assert logging.root.handlers == [handler]  # the redirect is undone


# -- the estimate of the time left -------------------------------------------------------------------------------


def first_trial() -> Ended:
    """The first trial of a 3 x 3 grid: it trained the baseline (80 s) and fine-tuned amount 0 (12 s)."""
    return Ended(95.0, {"data": 1.0, "baseline": 80.0, "baseline_metrics": 1.0, "prune": 12.0}, GRID[0])


def test_after_the_first_trial_the_estimate_counts_its_baseline_once_not_per_trial():
    left = remaining([first_trial()], GRID[1:], SHAPED_BY)
    # 8 trials of 1 s each of their own, and the 2 other amounts' prune stages: nothing else is computed again
    assert left == pytest.approx(8 * 1.0 + 2 * 12.0)
    naive = 95.0 * 8  # the mean of the trials so far, times the trials to come: what the sweep said before
    assert naive / left > 20


def test_trials_that_loaded_their_stages_lower_the_own_time_and_keep_the_stage_costs():
    ended = [first_trial(), Ended(2.0, {}, GRID[1]), Ended(3.0, {}, GRID[2]), Ended(14.0, {"prune": 11.0}, GRID[3])]
    own = (1.0 + 2.0 + 3.0 + 3.0) / 4  # each trial less the stages it computed
    # 5 trials to come; of them only amount 0.9 prunes anew, at the mean of the two prune stages so far
    assert remaining(ended, GRID[4:], SHAPED_BY) == pytest.approx(5 * own + 1 * 11.5)


def test_a_stage_every_point_shapes_is_counted_for_every_unknown_point():
    ended = [Ended(10.0, {"baseline": 6.0, "prune": 2.0}, {"pruning.amount": 0.3})]
    # a sampler's next points are unknown: each computes its own prune stage, none a baseline
    assert remaining(ended, [None, None], {"baseline": (), "prune": ("pruning.amount",)}) == pytest.approx(2 * 4.0)


def test_no_estimate_before_a_trial_ended():
    assert remaining([], GRID, SHAPED_BY) is None


def test_the_stage_times_a_trial_returns_are_read_beside_its_metrics():
    assert stage_seconds({"top1": 95.0, "seconds.baseline": 80.0, "seconds.prune": 12}) == {"baseline": 80.0,
                                                                                              "prune": 12.0}


def test_swept_keys_shape_the_stages_their_fields_declare(make_cfg):
    cfg = make_cfg("pruning=global_magnitude")
    swept = ["pruning.amount", "quantization", "train.seed"]
    assert identity.swept_shaping(cfg, swept, "baseline") == ("train.seed",)
    assert identity.swept_shaping(cfg, swept, "prune") == ("pruning.amount", "train.seed")
    assert set(identity.swept_shaping(cfg, swept, "trial")) == set(swept)
