"""Pruning methods. Each is `fn(model, cfg, ctx) -> model`: it prunes, folds the masks in (permanent) and returns
the pruned model. A multi-stage method may call `ctx.finetune(model)` between its stages; the pipeline fine-tunes
after the last one.

Prunable weights are the weight tensors of every Conv2d and Linear layer, classifier included, as in ShrinkBench;
biases and BatchNorm parameters are kept. The unstructured pruners (`global_magnitude`, `layer_magnitude`,
`random`) work on the weights as stored (`stored_weights`): the float tensors of a float, fp16 or bf16 model, and
the integers of a torch.ao (FX) or PT2E int8 model, zeroed to their zero-point with scales and zero-points kept.
So `quantization.order=quantize_then_prune` prunes the deployed model in its own domain, as
001_17951392d90394c9.txt does; those functions carry `prunes_stored_weights`. Every layer ranks by the magnitude of
the value a weight stands for (dequantized for int8), so one global ranking compares layers of different scales.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.ao.nn.quantized as nnq
from omegaconf import OmegaConf
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)
# torch.ao's quantized Conv2d / Linear; their fused (ConvReLU2d, LinearReLU) and dynamic Linear forms subclass these.
QUANTIZED = (nnq.Conv2d, nnq.Linear)


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The float Conv2d / Linear layers (fine-tuning masks); `stored_weights` also sees quantized ones."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            yield name, module


@dataclass
class ModuleWeight:
    """One prunable weight as the model stores it: a float tensor, or an int8 tensor with its scales/zero-points."""

    name: str  # the layer's name in the float model (a CastInputs wrapper's `inner.` left out)
    module: nn.Module

    def tensor(self) -> torch.Tensor:
        return self.module.weight() if isinstance(self.module, QUANTIZED) else self.module.weight.detach()

    def magnitude(self) -> torch.Tensor:
        """|value| in float32: for int8, |(q - zero_point) * scale|, so layers with different scales (and the
        channels of a per-channel layer) rank against each other by the value they compute with, not by the
        integer, whose meaning depends on the scale."""
        weight = self.tensor()
        return (weight.dequantize() if weight.is_quantized else weight).float().abs()

    def set_zero(self, mask: torch.Tensor) -> None:
        """Zero the weights where `mask` is True, in their stored domain: the integer becomes the zero-point and
        scales/zero-points are kept, so the result is the same int8 format with exact zeros."""
        if not mask.any():
            return
        if not isinstance(self.module, QUANTIZED):
            with torch.no_grad():
                self.module.weight.masked_fill_(mask, 0)
            return
        weight = self.tensor()
        if not weight.is_quantized:  # dynamic Linear with float16 weights
            self.module.set_weight_bias(weight.masked_fill(mask, 0), self.module.bias())
            return
        ints = weight.int_repr()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            ints = ints.masked_fill(mask, weight.q_zero_point())
            pruned = torch._make_per_tensor_quantized_tensor(ints, weight.q_scale(), weight.q_zero_point())
        elif weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            axis = weight.q_per_channel_axis()
            shape = [-1 if d == axis else 1 for d in range(ints.dim())]
            zero_points = weight.q_per_channel_zero_points().to(ints.dtype).view(shape).expand_as(ints)
            ints = torch.where(mask, zero_points, ints)
            pruned = torch._make_per_channel_quantized_tensor(
                ints, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), axis)
        else:
            raise ValueError(f"layer {self.name}: cannot prune weights with qscheme {weight.qscheme()}")
        self.module.set_weight_bias(pruned, self.module.bias())


@dataclass
class GraphWeight:
    """An int8 weight of a PT2E-converted graph (torchao `convert_pt2e`): an int8 buffer that a dequantize node
    turns into the float weight of a conv or linear, with its scales/zero-points; zeroed in place."""

    name: str  # the float layer it came from (the consuming node's nn_module_stack), else the buffer's name
    ints: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None  # per-channel axis, None for per-tensor

    def _per_element(self, value) -> torch.Tensor:
        value = torch.as_tensor(value)
        if self.axis is None:
            return value
        return value.view([-1 if d == self.axis else 1 for d in range(self.ints.dim())])

    def tensor(self) -> torch.Tensor:
        return self.ints

    def magnitude(self) -> torch.Tensor:
        return ((self.ints.float() - self._per_element(self.zero_point)) * self._per_element(self.scale)).abs()

    def set_zero(self, mask: torch.Tensor) -> None:
        zero = self._per_element(self.zero_point).to(self.ints.dtype).expand_as(self.ints)
        self.ints.copy_(torch.where(mask, zero, self.ints))


def _graph_weights(model: nn.Module) -> list[GraphWeight]:
    graph = getattr(model, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return []

    def value(arg):
        return functools.reduce(getattr, arg.target.split("."), model) if isinstance(arg, torch.fx.Node) else arg

    found = []
    for node in graph.nodes:
        kind = str(node.target)  # e.g. quantized_decomposed.dequantize_per_channel.default
        source = node.args[0] if node.args else None
        if not kind.startswith("quantized_decomposed.dequantize_per_") or getattr(source, "op", None) != "get_attr":
            continue
        ints = value(source)
        if ints.dim() < 2 or ints.is_floating_point():
            continue  # a bias or a float constant, not an integer weight
        stack = [meta for user in node.users for meta in user.meta.get("nn_module_stack", {}).values()]
        name = stack[-1][0] if stack else source.target
        axis = node.args[3] if "per_channel" in kind else None
        found.append(GraphWeight(name, ints, value(node.args[1]), value(node.args[2]), axis))
    return found


StoredWeight = ModuleWeight | GraphWeight


def stored_weights(model: nn.Module) -> list[StoredWeight]:
    """Every prunable weight of a float, fp16/bf16 (quantize.CastInputs), torch.ao int8 or PT2E int8 model."""
    from pqsweep.quantize import CastInputs  # lazy: quantize imports this module

    root = model.inner if isinstance(model, CastInputs) else model
    modules = [ModuleWeight(name, module) for name, module in root.named_modules()
               if isinstance(module, PRUNABLE + QUANTIZED)]
    # PT2E graphs may sit inside a wrapper (pqsweep.pt2e.Int8Pt2e keeps its int8 graph as `reference`)
    return modules + [w for module in root.modules() for w in _graph_weights(module)]


def _stored(model: nn.Module) -> nn.Module:
    """After stored weights changed: a model that runs a lowered copy of its weights (PT2E) rebuilds it."""
    if callable(getattr(model, "relower", None)):
        model.relower()
    return model


def _magnitude(weight: StoredWeight) -> torch.Tensor:
    return weight.magnitude()


def _zero_lowest(weights: list[StoredWeight], scores: list[torch.Tensor], count: int) -> None:
    """Zero the `count` weights with the lowest scores over all `weights` together.

    Ties are broken by position (layer order, then row-major), so the count is exact and the result repeatable.
    A threshold from kthvalue, not a full argsort: it needs a quarter of the memory on VGG-sized models.
    """
    if count <= 0:
        return
    flat = torch.cat([s.flatten() for s in scores])
    threshold = flat.kthvalue(count).values
    chosen = flat < threshold
    ties = (flat == threshold).nonzero().flatten()
    chosen[ties[: count - int(chosen.sum())]] = True
    for weight, score, mask in zip(weights, scores, chosen.split([s.numel() for s in scores])):
        weight.set_zero(mask.view_as(score))


def _count(amount: float, n: int) -> int:
    return int(round(amount * n))


def _layer_amounts(weights: list[StoredWeight], cfg, default: float) -> list[float]:
    """Per-layer amounts: `pruning.layer_amounts` for the layers it names, `default` for the rest."""
    named = read_layer_amounts(cfg)
    unknown = sorted(set(named) - {w.name for w in weights})
    if unknown:
        raise ValueError(f"pruning.layer_amounts={cfg.layer_amounts}: no prunable layer named {', '.join(unknown)} "
                         f"(layers: {', '.join(w.name for w in weights)})")
    return [named.get(w.name, default) for w in weights]


def _refuse_layer_amounts(cfg, method: str) -> None:
    if cfg.get("layer_amounts"):
        raise ValueError(f"pruning.layer_amounts={cfg.layer_amounts}: per-layer amounts need a per-layer method, "
                         f"not {method} (use pruning=layer_magnitude, or iterative with scope=layer)")


def _weights_to_prune(model: nn.Module, amount: float) -> list[StoredWeight]:
    weights = stored_weights(model)
    if amount > 0 and not weights:
        raise ValueError(f"pruning.amount={amount}: {type(model).__name__} has no weights this pruner can reach "
                         "(float Conv2d/Linear, torch.ao int8 Conv2d/Linear, PT2E int8 graphs)")
    return weights


def _prune(weights: list[StoredWeight], score: Callable, amount: float | list[float]) -> None:
    """One `amount` for all weights ranked together, or one per layer (a list) ranked within each layer."""
    if isinstance(amount, list):
        for weight, layer_amount in zip(weights, amount):
            scores = score(weight)
            _zero_lowest([weight], [scores], _count(layer_amount, scores.numel()))
    else:
        scores = [score(w) for w in weights]
        _zero_lowest(weights, scores, _count(amount, sum(s.numel() for s in scores)))


def no_pruning(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """The dense baseline: keep every weight."""
    return model


def global_magnitude(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """Unstructured magnitude pruning ranked over all prunable layers together (Han et al.): zeroes the
    round(amount * n) weights of smallest |value| among all n prunable weights."""
    _refuse_layer_amounts(cfg, "global_magnitude")
    _prune(_weights_to_prune(model, cfg.amount), _magnitude, float(cfg.amount))
    return _stored(model)


def layer_magnitude(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """Unstructured magnitude pruning layer by layer: round(amount * n_l) smallest weights of each layer l, with
    `amount` from `pruning.layer_amounts` for the layers that file names and `pruning.amount` for the rest."""
    weights = _weights_to_prune(model, cfg.amount)
    _prune(weights, _magnitude, _layer_amounts(weights, cfg, float(cfg.amount)))
    return _stored(model)


def random(model: nn.Module, cfg, ctx=None) -> nn.Module:
    """Random unstructured pruning, the control of every pruning study: round(amount * n) weights over all layers
    (per layer, with `pruning.layer_amounts`), chosen uniformly at random, seeded by `train.seed` (0 without a ctx).

    Weights already zero (int8 rounding, earlier pruning) count first and the rest are drawn uniformly among the
    survivors, so `amount` is the sparsity reached, as with the magnitude pruners.
    """
    seed = ctx.train_cfg.seed if ctx is not None and ctx.train_cfg is not None else 0
    generator = torch.Generator().manual_seed(int(seed))

    def score(weight: StoredWeight) -> torch.Tensor:
        magnitude = weight.magnitude()
        draw = torch.rand(magnitude.shape, generator=generator)
        return draw.masked_fill(magnitude == 0, -1.0)

    weights = _weights_to_prune(model, cfg.amount)
    per_layer = cfg.get("layer_amounts")
    _prune(weights, score, _layer_amounts(weights, cfg, float(cfg.amount)) if per_layer else float(cfg.amount))
    return _stored(model)


# quantize_then_prune may run these on a converted int8 model (config.validate checks this attribute).
for _pruner in (no_pruning, global_magnitude, layer_magnitude, random):
    _pruner.prunes_stored_weights = True


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
        _refuse_layer_amounts(cfg, "iterative with scope=global")
    elif scope != "layer":
        raise ValueError(f"pruning.scope={scope} is not allowed: must be global or layer")
    weights = _weights_to_prune(model, cfg.amount)
    if scope == "global":
        targets = round_targets(float(cfg.amount), rounds, cfg.schedule)
    else:  # one schedule per layer, each to that layer's final amount; targets[t] lists round t's amounts
        finals = _layer_amounts(weights, cfg, float(cfg.amount))
        targets = [list(t) for t in zip(*(round_targets(final, rounds, cfg.schedule) for final in finals))]
    for t in range(rounds):
        _prune(weights, _magnitude, targets[t])
        if rewind == "reinit":
            rewind_to_init(model, ctx.initial_state)
        if t < rounds - 1:
            ctx.finetune(model, epochs=cfg.get("round_epochs"), desc=f"finetune round {t + 1}/{rounds}")
    return model


def rewind_to_init(model: nn.Module, initial_state: dict) -> None:
    """Every parameter and buffer back to `initial_state`, except that pruned weights stay zero."""
    masks = zero_masks(model)
    model.load_state_dict(initial_state)
    apply_masks(model, masks)


def read_layer_amounts(cfg) -> dict[str, float]:
    """`pruning.layer_amounts`: a YAML file {layer name: amount} (pqsweep-sensitivity writes one), or {} if unset."""
    if not cfg.get("layer_amounts"):
        return {}
    path = Path(cfg.layer_amounts).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pruning.layer_amounts={cfg.layer_amounts}: no such file")
    amounts = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(amounts, dict) or not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in amounts.values()):
        raise ValueError(f"pruning.layer_amounts={cfg.layer_amounts}: must map layer names to fractions in [0, 1)")
    return {str(k): float(v) for k, v in amounts.items()}


def footprint(model: nn.Module) -> tuple[int, int]:
    """(prunable weights, of which zero), as stored: tells whether a pruner changed anything."""
    magnitudes = [w.magnitude() for w in stored_weights(model)]
    return sum(m.numel() for m in magnitudes), sum(int((m == 0).sum()) for m in magnitudes)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each prunable weight is zero now; fine-tuning re-applies these so pruned weights stay pruned."""
    return {name: module.weight.detach() == 0 for name, module in prunable_layers(model)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, module in prunable_layers(model):
            if name in masks and masks[name].any():
                module.weight.masked_fill_(masks[name], 0.0)
