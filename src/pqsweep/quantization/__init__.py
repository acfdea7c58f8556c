"""Quantization methods, one module per family; each quantizer is `fn(model, cfg, ctx) -> model`."""
