"""Iterative magnitude pruning: rounds of pruning to a schedule, with fine-tuning or re-initialisation between them."""

from __future__ import annotations

from torch import nn

from pqsweep.pruning.unstructured import layer_amounts_for, magnitude, prune_by_score, refuse_layer_amounts, weights_to_prune
from pqsweep.weights import apply_masks, zero_masks

def round_targets(amount: float, rounds: int, schedule: str) -> list[float]:
    """Cumulative sparsity after each round t = 1..rounds; both schedules end at `amount`.

    geometric (Han et al.): each round removes the same fraction of what is left, 1 - (1 - amount)^(t / rounds).
    gradual (Zhu & Gupta): s_t = amount * (1 - (1 - t / rounds)^3), large steps first, small ones near the end.
    """
    schedule = getattr(schedule, "value", schedule)
    if schedule == "geometric":
        return [1 - (1 - amount) ** (t / rounds) for t in range(1, rounds + 1)]
    if schedule == "gradual":
        return [amount * (1 - (1 - t / rounds) ** 3) for t in range(1, rounds + 1)]
    raise ValueError(f"pruning.schedule={schedule} is not allowed: must be geometric or gradual")


def iterative(model: nn.Module, cfg, ctx) -> nn.Module:
    """Iterative magnitude pruning: `rounds` rounds to the cumulative targets of `round_targets(amount, rounds,
    schedule)`, ranked globally or per layer (`scope`; per-layer amounts from `layer_amounts` follow the same
    schedule to their own final amount), with `ctx.finetune` after every round but the last (the pipeline
    fine-tunes after the pruner). Weights pruned in a round stay zero: fine-tuning holds them at zero.

    rewind=finetune keeps the surviving weights and fine-tunes them (Han et al.; 003_efefe08f870249b7.txt for
    large nets). rewind=reinit, after each round's pruning, sets the surviving weights, biases and BatchNorm
    parameters and statistics back to their values at initialisation (`ctx.initial_state`: PyTorch's default
    uniform Kaiming draws, 003's "uniform re-initialisation" for compact nets) and retrains them; pruned weights
    stay zero and the next round ranks the retrained weights.

    Between rounds it fine-tunes `round_epochs` epochs (default train.finetune_epochs); the pipeline's own
    fine-tuning (train.finetune_epochs) follows the last round.
    """
    rounds, scope = int(cfg.rounds), getattr(cfg.scope, "value", cfg.scope)
    rewind = getattr(cfg.rewind, "value", cfg.rewind)
    if rounds > 1 and ctx is None:
        raise ValueError(f"pruning.rounds={rounds}: fine-tuning between rounds needs a Context (ctx)")
    if rewind == "reinit" and (ctx is None or ctx.initial_state is None):
        raise ValueError("pruning.rewind=reinit: needs ctx.initial_state, the model's weights at initialisation")
    if scope == "global":
        refuse_layer_amounts(cfg, "iterative with scope=global")
    elif scope != "layer":
        raise ValueError(f"pruning.scope={scope} is not allowed: must be global or layer")
    weights = weights_to_prune(model, cfg.amount)
    if scope == "global":
        targets = round_targets(float(cfg.amount), rounds, cfg.schedule)
    else:  # one schedule per layer, each to that layer's final amount; targets[t] lists round t's amounts
        finals = layer_amounts_for(weights, cfg, float(cfg.amount))
        targets = [list(t) for t in zip(*(round_targets(final, rounds, cfg.schedule) for final in finals))]
    for t in range(rounds):
        prune_by_score(weights, magnitude, targets[t])
        if rewind == "reinit":
            rewind_to_init(model, ctx.initial_state)
        if t < rounds - 1 and rewind in ("weights", "lr"):  # rewound and retrained each round (Renda et al.)
            ctx.retrain(model, desc=f"retrain round {t + 1}/{rounds}")
        elif t < rounds - 1:
            ctx.finetune(model, epochs=cfg.get("round_epochs"), desc=f"finetune round {t + 1}/{rounds}")
    return model


def rewind_to_init(model: nn.Module, initial_state: dict) -> None:
    """Every parameter and buffer back to `initial_state`, except that pruned weights stay zero."""
    masks = zero_masks(model)
    model.load_state_dict(initial_state)
    apply_masks(model, masks)
