"""Structured pruning: whole filters with the smallest L1 norms (Li et al.) removed, alone or before magnitude pruning.

`prune_filters` removes the output channels of convolutions (and hidden Linear features) together with everything
that consumes them, so parameters, MACs, file size and latency all fall; the classifier's outputs are kept.
Torch-Pruning's dependency graph finds what must be removed together (residual adds, depthwise convs, flatten into
a Linear). It cannot trace torchvision ShuffleNetV2: its channel shuffle (a view/transpose/view outside any module)
makes `DependencyGraph.build_dependency` fail with ZeroDivisionError in 1.6.1 (VainF/Torch-Pruning issues #14, #45),
so ShuffleNetV2 gets its own surgery on the channels that no split, concat or shuffle touches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch_pruning as tp
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2

from pqsweep.pruning.unstructured import global_magnitude, read_layer_amounts
from pqsweep.train import batches

log = logging.getLogger(__name__)

SCOPES = ("layer", "global")


def l1_filter(model: nn.Module, cfg, ctx) -> nn.Module:
    """`pruning=l1_filter`: remove `amount` of the filters of every layer (scope=layer) or of all (scope=global),
    ranked by `importance` (Li et al.'s L1 norm by default)."""
    return prune_filters(model, ctx.example, float(cfg.amount), _scope(cfg), read_layer_amounts(cfg),
                         keep_tied=bool(cfg.get("keep_tied", False)), importance=criterion(model, cfg, ctx))


def criterion(model: nn.Module, cfg, ctx) -> tp.importance.Importance:
    """The importance `cfg.importance` names, ready to score `model`: Taylor and Hessian with the gradients of
    `cfg.importance_batches` training batches already in the model's `.grad` (prune_filters clears them)."""
    name = str(getattr(cfg.get("importance"), "value", cfg.get("importance") or "l1"))
    importance = CRITERIA[name]()
    if name in GRADIENTS:
        GRADIENTS[name](model, batches(ctx.loaders["train"], int(cfg.importance_batches)), ctx.device)
    return importance


def _taylor_gradients(model: nn.Module, data, device: str) -> None:
    """dL/dw summed over the batches (eval mode: BatchNorm's statistics stay as they are)."""
    model.to(device).eval().zero_grad(set_to_none=True)
    for x, y in data:
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.cpu()


def _fisher_diagonal(model: nn.Module, data, device: str) -> None:
    """The mean squared per-sample gradient (the empirical Fisher, OBD's Hessian diagonal), put in each `.grad`,
    where GroupHessianImportance reads it when it has accumulated none itself. Its own `accumulate_grad` keys its
    sums by parameter but tests for them by name, so each call replaces the sum (torch-pruning 1.6.1)."""
    model.to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    squares, count = [torch.zeros_like(p) for p in params], 0
    for x, y in data:
        for loss in F.cross_entropy(model(x.to(device)), y.to(device), reduction="none"):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            for total, grad in zip(squares, grads):
                if grad is not None:
                    total += grad.detach() ** 2
            count += 1
    for p, total in zip(params, squares):
        p.grad = total / count
    model.cpu()


# Torch-Pruning's criteria unnormalised (`_select` normalises where it ranks globally); LAMP's normaliser is its
# definition, so its scores already compare across layers.
CRITERIA: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: FilterL1Importance(),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
    "taylor": lambda: tp.importance.GroupTaylorImportance(normalizer=None),
    "bn_scale": lambda: tp.importance.BNScaleImportance(normalizer=None),
    "fpgm": lambda: tp.importance.FPGMImportance(normalizer=None),
    "lamp": lambda: tp.importance.LAMPImportance(),
    "hessian": lambda: tp.importance.GroupHessianImportance(normalizer=None),
    "random": lambda: tp.importance.RandomImportance(),
}
GRADIENTS = {"taylor": _taylor_gradients, "hessian": _fisher_diagonal}


def structured_step(model: nn.Module, cfg, ctx) -> nn.Module:
    """The first step of `pruning=structured_unstructured`: l1_filter at `structured` (per-layer fractions from
    `layer_amounts`), then fine-tuning. Its option file names it as `structured_step`, so the pipeline runs and caches
    it as the structured stage, shared by every unstructured amount that follows it (002's 4x4 grid)."""
    layer_amounts = read_layer_amounts(cfg)
    if cfg.structured > 0 or layer_amounts:
        model = prune_filters(model, ctx.example, float(cfg.structured), _scope(cfg), layer_amounts,
                              keep_tied=bool(cfg.get("keep_tied", False)), importance=criterion(model, cfg, ctx))
        ctx.finetune(model, desc="finetune structured")
    return model


def structured_unstructured(model: nn.Module, cfg, ctx) -> nn.Module:
    """The second step of `pruning=structured_unstructured`, on the structured step's model: global magnitude at
    `unstructured` of the weights that remain; the pipeline fine-tunes after (pqsweep.pruning.prune runs both)."""
    return global_magnitude(model, OmegaConf.create({"amount": float(cfg.unstructured)}))


def prune_filters(model: nn.Module, example: torch.Tensor, amount: float, scope: str = "layer",
                  layer_amounts: dict[str, float] | None = None, keep_tied: bool = False,
                  importance: tp.importance.Importance | None = None) -> nn.Module:
    """Remove the filters `importance` scores lowest (by default the smallest L1 norms), `amount` of them per layer
    or ranked globally, in place.

    `layer_amounts` {module name: fraction} overrides `amount` for the channels that module produces (and the
    layers tied to them). At least one channel of every layer survives; the model's last nn.Linear (the
    classifier) keeps all its outputs. `keep_tied` leaves whole the channels that a residual add ties to several
    convolutions (a ResNet's stem, every block's last conv and its shortcut), so only each block's inner channels
    are pruned: Li et al.'s setting for ResNets, where the residual-tied layers are the sensitive ones.
    """
    if scope not in SCOPES:
        raise ValueError(f"pruning.scope={scope} is not allowed: must be one of {', '.join(SCOPES)}")
    layer_amounts = dict(layer_amounts or {})
    for key, value in [("pruning.amount", amount)] + [(f"layer_amounts[{k}]", v) for k, v in layer_amounts.items()]:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{key}={value} is not allowed: must be a fraction in [0, 1)")
    unknown = sorted(set(layer_amounts) - {name for name, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"pruning.layer_amounts names layers the model does not have: {', '.join(unknown)}")
    importance = importance or FilterL1Importance()
    if amount == 0 and not any(layer_amounts.values()):
        model.zero_grad(set_to_none=True)
        return model
    if isinstance(model, ShuffleNetV2):
        if not isinstance(importance, FilterL1Importance):
            raise ValueError("pruning.importance: ShuffleNetV2 is pruned by pqsweep's own surgery, by L1 norm only")
        units = _shufflenet_units(model)
    else:
        units = _graph_units(model, example, importance)
    model.zero_grad(set_to_none=True)  # the gradients a criterion scored by
    if keep_tied:
        units = [unit for unit in units if not unit.tied]
    for name in sorted(set(layer_amounts) - {member for unit in units for member in unit.members}):
        # A sensitivity scan also ranks the classifier and layers tied to a shuffle; their channels stay whole.
        log.info("l1_filter: %s has no prunable output channels here; layer_amounts[%s] not applied", name, name)
    normalised = isinstance(importance, tp.importance.LAMPImportance)
    for unit, idxs in _select(units, amount, scope, layer_amounts, normalise=not normalised):
        if idxs:
            unit.remove(idxs)
    return model


def classifier_name(model: nn.Module) -> str:
    """The name of the model's last nn.Linear: the layer whose outputs are the classes."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("pruning=l1_filter needs a model whose classifier is an nn.Linear; this model has none")
    return names[-1]


def _scope(cfg) -> str:
    return getattr(cfg.scope, "value", cfg.scope)  # an enum member from the schema, a plain string otherwise


@dataclass
class _Unit:
    """Channels that go together: scored by the L1 norm of the filters that make them, removed by `remove`."""

    members: list[str]  # every layer whose output channels these are; layer_amounts may name any of them
    scores: torch.Tensor  # one per channel
    remove: Callable[[list[int]], None]  # channel indices -> removes them from every layer that uses them
    tied: bool = False  # several convolutions (not depthwise) or Linears make these channels: a residual add

    def own_amount(self, layer_amounts: dict[str, float]) -> float | None:
        return next((layer_amounts[name] for name in self.members if name in layer_amounts), None)


def _select(units: list[_Unit], amount: float, scope: str, layer_amounts,
            normalise: bool = True) -> list[tuple[_Unit, list[int]]]:
    """Which channels each unit loses: its own lowest `fraction` (scope=layer, or a layer named in layer_amounts),
    or the lowest `amount` of all the other units' channels ranked together (scope=global). Every unit keeps at
    least one channel."""
    chosen, ranked = [], []
    for unit in units:
        own = unit.own_amount(layer_amounts)
        if own is None and scope == "global":
            ranked.append(unit)
            continue
        fraction = amount if own is None else own
        # As Torch-Pruning counts: keep int(n * (1 - fraction)) channels, but never none.
        n_remove = min(len(unit.scores) - int(len(unit.scores) * (1 - fraction)), len(unit.scores) - 1)
        chosen.append((unit, unit.scores.argsort()[:n_remove].tolist()))
    if ranked:
        # Each unit's scores over their mean (Torch-Pruning's default normaliser): this changes no ranking within
        # a layer, and lets one ranking compare layers whose filters have very different fan-ins.
        normalised = [unit.scores / unit.scores.mean().clamp_min(1e-12) if normalise else unit.scores
                      for unit in ranked]
        flat = torch.cat(normalised)
        n_remove = len(flat) - int(len(flat) * (1 - amount))
        # The n lowest by position, not `score <= threshold`: equal scores must not take a whole layer at once.
        lowest = torch.zeros(len(flat), dtype=torch.bool)
        lowest[flat.argsort(stable=True)[:n_remove]] = True
        for unit, scores, removed in zip(ranked, normalised, lowest.split([len(s) for s in normalised])):
            if removed.all():
                removed[scores.argmax()] = False
            chosen.append((unit, removed.nonzero().flatten().tolist()))
    return chosen


# --- Torch-Pruning's dependency graph: every model but ShuffleNetV2 -----------------------------------------------


class FilterL1Importance(tp.importance.GroupMagnitudeImportance):
    """Li et al.'s score: ||F||_1 of each output filter. Where a residual add (or a depthwise conv) ties several
    layers' outputs together, their filters' norms are summed; consumers' input weights and BN scales do not
    count. Unnormalised: `_select` normalises where it ranks globally."""

    OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)

    def __init__(self):
        super().__init__(p=1, group_reduction="sum", normalizer=None, target_types=[nn.Conv2d, nn.Linear])

    @torch.no_grad()
    def __call__(self, group):
        scores, root_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            if isinstance(dep.layer, (nn.Conv2d, nn.Linear)) and dep.pruning_fn in self.OUT_FNS:
                scores.append(dep.layer.weight.detach()[idxs].flatten(1).abs().sum(1))
                root_idxs.append(group[i].root_idxs)
        return self._reduce(scores, root_idxs) if scores else None


def _graph_units(model: nn.Module, example: torch.Tensor,
                 importance: tp.importance.Importance | None = None) -> list[_Unit]:
    """One unit per group of Torch-Pruning's dependency graph rooted at a Conv2d or Linear, classifier excepted,
    scored by `importance` (default: L1 of the filters). A group the criterion cannot score (bn_scale where no
    BatchNorm follows a layer) stays whole, and the log says so.

    The graph's groups are used directly rather than through `BasePruner`: where a ratio rounds to every channel
    of a layer, BasePruner leaves that layer whole (`check_pruning_group`); `_select` keeps its best channel.
    """
    names = {module: name for name, module in model.named_modules()}
    head = model.get_submodule(classifier_name(model))
    training = model.training
    model.eval()  # tracing runs one forward pass: in train mode it would move the BN running statistics
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    model.train(training)
    importance = importance or FilterL1Importance()
    units = []
    for group in graph.get_all_groups(ignored_layers=list(head.modules()), root_module_types=[nn.Conv2d, nn.Linear]):
        scores = importance(group)
        if scores is None:
            if not isinstance(importance, FilterL1Importance):
                log.info("%s: %s cannot be scored by it; its channels stay whole", type(importance).__name__,
                         names.get(group[0].dep.target.module, "a layer"))
            continue
        scores = scores.detach().float().cpu()
        members = [names[dep.target.module] for dep, _ in group
                   if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names]
        root = group[0].dep
        producers = {dep.target.module for dep, _ in group if dep.handler in FilterL1Importance.OUT_FNS[:2]
                     and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                     and getattr(dep.target.module, "groups", 1) == 1}
        units.append(_Unit(members, scores, partial(_prune_group, graph, root.target.module, root.handler),
                           tied=len(producers) > 1))
    return units


def _prune_group(graph, module: nn.Module, handler, idxs: list[int]) -> None:
    # The group is built when it is pruned, as BasePruner.step does, so it sees the layers as earlier groups left them.
    graph.get_pruning_group(module, handler, idxs).prune()


# --- ShuffleNetV2: own surgery ------------------------------------------------------------------------------------


def _shufflenet_units(model: ShuffleNetV2) -> list[_Unit]:
    """Each block's branch2 inner channels (1x1 conv -> BN -> depthwise 3x3 -> BN -> 1x1 conv) and the last 1x1
    conv's channels (conv5 -> BN -> global mean -> fc). Block inputs and outputs are split, concatenated and
    shuffled, so they stay whole."""
    chains = [(f"{name}.branch2", [0, 1, 3, 4], 5) for name, block in model.named_modules()
              if isinstance(block, InvertedResidual)]
    units = []
    for prefix, chain, consumer in chains + [("conv5", [0, 1], "fc")]:
        members = [f"{prefix}.{i}" for i in chain]
        consumer = model.fc if consumer == "fc" else model.get_submodule(f"{prefix}.{consumer}")
        layers = [model.get_submodule(name) for name in members]
        scores = layers[0].weight.detach().flatten(1).abs().sum(1)  # the producing 1x1 conv's filters
        units.append(_Unit(members, scores, partial(_remove_channels, layers, consumer)))
    return units


def _remove_channels(layers: list[nn.Module], consumer: nn.Module, idxs: list[int]) -> None:
    producer, *chain = layers
    tp.prune_conv_out_channels(producer, idxs)
    for module in chain:
        if isinstance(module, nn.BatchNorm2d):
            tp.prune_batchnorm_out_channels(module, idxs)
        else:  # the depthwise 3x3 has one filter per channel: its inputs, outputs and groups shrink together
            tp.prune_depthwise_conv_out_channels(module, idxs)
    if isinstance(consumer, nn.Linear):
        tp.prune_linear_in_channels(consumer, idxs)
    else:
        tp.prune_conv_in_channels(consumer, idxs)
