"""Group-norm sparse learning, then structured pruning: Torch-Pruning's GroupNormPruner (Fang et al., "DepGraph:
Towards Any Structural Pruning", CVPR 2023), used as the library ships it.

`pruning=group_norm pruning.amount=0.5`: the baseline trains `sparse_epochs` more epochs at the fine-tuning rate
with the pruner's group-norm regulariser (`reg`) added to every gradient, which drives each group of coupled
channels (a conv's filters, the BatchNorm and the next layer's inputs they feed) toward zero together, the
unimportant ones harder; then the pruner removes `amount` of the channels of every layer (scope=layer) or of all
(scope=global) with the smallest group L2 norms. The pipeline fine-tunes after, as after any pruning.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from pqsweep.pruning.structured import classifier_name
from pqsweep.train import fit


def group_norm(model: nn.Module, cfg, ctx) -> nn.Module:
    head = model.get_submodule(classifier_name(model))
    model.eval()  # tracing runs one forward pass: in train mode it would move the BatchNorm statistics
    pruner = tp.pruner.GroupNormPruner(
        model, ctx.example, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=float(cfg.reg),
        pruning_ratio=float(cfg.amount), global_pruning=str(getattr(cfg.scope, "value", cfg.scope)) == "global",
        ignored_layers=[head])
    if cfg.sparse_epochs > 0:
        fit(model, ctx.loaders["train"], ctx.train_cfg, int(cfg.sparse_epochs), lr=ctx.finetune_lr(),
            device=ctx.device, before_step=lambda: pruner.regularize(model), desc="sparse learning")
    model.cpu().eval()
    pruner.step()
    return model
