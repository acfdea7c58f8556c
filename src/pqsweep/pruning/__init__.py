"""Pruning methods, one module per family; each pruner is `fn(model, cfg, ctx) -> model`."""
