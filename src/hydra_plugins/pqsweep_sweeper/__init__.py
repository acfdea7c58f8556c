"""Hydra finds sweepers only among the plugins under the `hydra_plugins` namespace: this import registers ours."""

from pqsweep.sweeper import OptunaSweeper

__all__ = ["OptunaSweeper"]
