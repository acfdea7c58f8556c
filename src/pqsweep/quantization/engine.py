"""torch.ao's settings every torch.ao quantizer shares: the quantized engine, option values as strings, and its
deprecation warnings (torch.ao.quantization is deprecated in favour of torchao; pqsweep keeps it on purpose)."""

from __future__ import annotations

import warnings

import torch


def option_value(option) -> str:
    """An enum member's value or a plain string (configs built with OmegaConf.create hold strings)."""
    return option.value if hasattr(option, "value") else str(option)


def set_engine(engine) -> None:
    name = option_value(engine)
    if name not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"quantization.engine={name}: not supported by this torch build "
            f"(supported: {', '.join(e for e in torch.backends.quantized.supported_engines if e != 'none')})"
        )
    torch.backends.quantized.engine = name


class quiet_deprecations(warnings.catch_warnings):
    """torch.ao.quantization warns on import and use that it is deprecated; we know, and say so above."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*are deprecated.*")
        return self
