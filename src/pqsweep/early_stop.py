"""Pareto-aware early stopping of a study's fine-tuning trials (`study.early_stop`).

In compression the cost side of a trial (size, MACs, latency, bits) is known before it fine-tunes: only its accuracy
is uncertain. So each trial of a sweep prices itself once pruning is done (its model quantized as the trial will
quantize it, then measured on every objective but accuracy), and after each fine-tune epoch reports its validation
top-1 to the study's storage (a user attribute: Optuna's `trial.report` is single-objective). It stops when a
finished trial at least as cheap on every cost objective is more accurate than its best case: its validation top-1
so far plus the largest gain any finished trial made from that epoch to its final top-1, plus `margin`:

    pqsweep -m sweep=mnist_cnn_pareto_nsgaii study.early_stop.enabled=true

A stopped trial is PRUNED in Optuna (a resumed study keeps the decision; a grid does not rerun its point) and its
MLflow run KILLED with the reason, the curve and the cost it had: FINISHED would list its partial accuracy among the
study's results. Its stage raises before it is saved, so nothing unfinished is cached. The study's storage is read
and written from the trial's own process, so it works across joblib workers and across machines on one RDB storage.
"""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from pqsweep.metrics import CURVED as QUALITY

if TYPE_CHECKING:  # the sweeper reads this module's names; torch loads only in a trial's process
    import torch
    from torch import nn

CURVE_ATTR = "pqsweep.curve"  # a trial's validation top-1 (%) after each of its fine-tune epochs, in order
COST_ATTR = "pqsweep.cost"  # its cost objectives, measured once pruned, before fine-tuning
TOP1_ATTR = "pqsweep.top1"  # a finished trial's top-1: where its curve led
STOPPED_ATTR = "pqsweep.stopped"  # why it was stopped


class Stopped(Exception):
    """Raised from a fine-tune epoch: the trial cannot reach the study's front. Not a failure: no stage records it."""

    def __init__(self, reason: str, curve: list[float], costs: dict[str, float], epochs_run: int, epochs_saved: int):
        super().__init__(reason)
        self.curve, self.costs, self.epochs_run, self.epochs_saved = curve, costs, epochs_run, epochs_saved


@dataclass(frozen=True)
class Finished:
    """A COMPLETE, feasible trial as the rule sees it."""

    number: int
    top1: float
    values: dict[str, float]  # its objectives
    curve: tuple[float, ...] = ()  # empty where its fine-tune was loaded from the cache


def better_or_equal(a: float, b: float, direction: str) -> bool:
    return a <= b if direction == "minimize" else a >= b


def verdict(curve: list[float], costs: dict[str, float], baseline_top1: float, finished: list[Finished],
            directions: dict[str, str], margin: float, min_epoch: int, min_trials: int) -> str | None:
    """Why a trial whose validation top-1 after each epoch so far is `curve`, at `costs`, cannot reach the front of
    `finished`; None while it may. Its best case is its top-1 now plus the largest gain to the end among the
    `min_trials` finished curves nearest to it at this epoch: a trial pruned to 30 % recovers tens of points where
    one at 90 % cannot, so the nearest curves say what this one may still gain, the far ones do not."""
    epoch = len(curve)
    learned = [f for f in finished if len(f.curve) >= epoch]
    if epoch < min_epoch or len(learned) < min_trials:
        return None
    nearest = sorted(learned, key=lambda f: abs(f.curve[epoch - 1] - curve[-1]))[:min_trials]
    gains = [f.top1 - f.curve[epoch - 1] for f in nearest]
    best = curve[-1] + max(gains) + margin  # the top-1 it could end at, at best
    reachable = {"top1": best, "top1_delta": best - baseline_top1}
    for f in finished:
        cheaper = all(better_or_equal(f.values[n], costs[n], directions[n]) for n in costs)
        ahead = all(f.values[n] > reachable[n] for n in directions if n in QUALITY)
        if cheaper and ahead:
            shown = ", ".join(f"{n} {f.values[n]:.4g} vs {costs[n]:.4g}" for n in costs)
            return (f"trial {f.number} reached top1 {f.top1:.2f}{' at ' + shown if shown else ''}; this one's best "
                    f"case is {best:.2f} (val {curve[-1]:.2f} at epoch {epoch} + the largest gain after it of the "
                    f"{len(gains)} nearest finished curves {max(gains):+.2f} + margin {margin:g})")
    return None


@contextmanager
def kept_random(*generators: "torch.Generator") -> Iterator[None]:
    """Whatever runs inside draws nothing the trial would see: the global and the loaders' random states are put
    back, so a trial's result is the same with stopping on or off."""
    import numpy as np
    import torch

    states = torch.get_rng_state(), np.random.get_state(), random.getstate(), [g.get_state() for g in generators]
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        for g, state in zip(generators, states[3]):
            g.set_state(state)


@dataclass
class Monitor:
    """One trial's side of the rule, in the trial's process: prices it, records its curve, applies `verdict`."""

    study: object  # optuna.Study, loaded from launch.storage
    number: int  # its trial
    settings: object  # study.early_stop
    objectives: list[str]
    directions: dict[str, str]
    baseline_top1: float
    evaluate: Callable[[nn.Module], float]  # validation top-1 of a model (a copy: observers and BN untouched)
    measure: Callable[[nn.Module], dict[str, float]]  # the deployed model's cost metrics, from a float model
    later_epochs: int = 0  # fine-tune epochs after the prune stage's (QAT's), saved too when it stops before them
    curve: list[float] = field(default_factory=list)
    costs: dict[str, float] | None = None
    quantizing: bool = False  # past the prune stage: its epochs are the quantization's
    unpriced: bool = False  # a cost objective it has no value for (its runtime cannot run it)

    def trial(self):
        from pqsweep.sweeper.study import live

        return live(self.study, next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.number))

    def price(self, model: nn.Module) -> None:
        """The trial's cost objectives, once, from its float model as pruned (before any fine-tuning)."""
        if self.costs is None and not self.unpriced:
            measured = self.measure(model)
            if any(n not in measured for n in self.objectives if n not in QUALITY):
                self.unpriced = True  # a runtime that cannot run it: no cost, so it is never stopped
                return
            self.costs = {n: float(measured[n]) for n in self.objectives if n not in QUALITY}
            self.trial().set_user_attr(COST_ATTR, self.costs)

    def epoch(self, model: nn.Module, done: int, epochs: int, run: int) -> None:
        """After epoch `done` of `epochs` of a fine-tune (`run`: the trial's fine-tune epochs so far): record the
        curve, and raise Stopped when the rule says so. A fine-tune before the trial is priced (a structured step)
        is not watched."""
        if self.costs is None:
            return
        self.curve.append(round(self.evaluate(model), 4))
        self.trial().set_user_attr(CURVE_ATTR, self.curve)
        s = self.settings
        reason = verdict(self.curve, self.costs, self.baseline_top1, finished(self.study, self.objectives),
                         self.directions, s.margin, s.min_epoch, s.min_trials)
        if reason is not None:
            saved = epochs - done + (0 if self.quantizing else self.later_epochs)
            raise Stopped(reason, list(self.curve), dict(self.costs), run, saved)


def finished(study, objectives: list[str]) -> list[Finished]:
    """The study's COMPLETE trials within its constraints, as the rule reads them."""
    from optuna.trial import TrialState

    found = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if TOP1_ATTR not in t.user_attrs or any(c > 0 for c in t.system_attrs.get("constraints", ())):
            continue
        found.append(Finished(t.number, float(t.user_attrs[TOP1_ATTR]), dict(zip(objectives, t.values)),
                              tuple(t.user_attrs.get(CURVE_ATTR, ()))))
    return found


def monitor(cfg, ctx, baseline_top1: float, measure: Callable[[nn.Module], dict[str, float]]) -> Monitor | None:
    """The trial's monitor where study.early_stop is on and the sweeper launched it (with its study's storage)."""
    if not cfg.study.early_stop.enabled or cfg.launch.storage is None:
        return None
    import optuna

    from pqsweep.metrics import METRICS
    from pqsweep.measure import accuracy
    from pqsweep.sweeper.study import open_storage

    study = optuna.load_study(study_name=cfg.launch.study, storage=open_storage(cfg.launch.storage, None))
    generators = [g for g in (loader.generator for loader in ctx.loaders.values()) if g is not None]

    def evaluate(model: nn.Module) -> float:
        with kept_random(*generators):
            return accuracy(copy.deepcopy(model).eval(), ctx.loaders["val"], ctx.device)["top1"]

    def priced(model: nn.Module) -> dict[str, float]:
        with kept_random(*generators):
            return measure(model)

    objectives = list(cfg.study.objectives)
    return Monitor(study, int(cfg.launch.trial), cfg.study.early_stop, objectives,
                   {n: METRICS[n].direction for n in objectives}, baseline_top1, evaluate, priced,
                   later_epochs=int(cfg.quantization.get("qat_epochs", 0) or 0))
