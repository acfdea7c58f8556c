"""Pruning methods, one module per family; each pruner is `fn(model, cfg, ctx) -> model`.

An option's file may also name a `structured_step` that runs before its `_target_` (structured_unstructured's filter
step): the pipeline runs and caches it as a stage of its own; `prune` runs an option's steps in order, as a
sensitivity scan or a test calls a method whole.
"""

from __future__ import annotations

from hydra.utils import get_method


def prune(model, cfg, ctx):
    """`model` through every step of the pruning option `cfg`."""
    step = cfg.get("structured_step")
    if step:
        model = get_method(step)(model, cfg, ctx)
    return get_method(cfg._target_)(model, cfg, ctx)
