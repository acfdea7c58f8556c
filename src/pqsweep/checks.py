"""The vocabulary of a check, shared by the config's range checks (pqsweep.validate) and the environment's
(pqsweep.environment): a Check names its key, value, verdict and what is allowed; the first failing one becomes a
one-line ConfigError."""

from __future__ import annotations

from typing import Any, NamedTuple

from omegaconf import DictConfig

# Modules whose callables configs may name as `_target_` (Hydra 1.4 asks every instantiate for such a list).
TRUSTED_TARGETS = ["pqsweep.*", "torch.optim.*", "hydra_plugins.*", "optuna.samplers.*", "hydra._internal.*"]


def trusted(target) -> bool:
    """Whether instantiate would accept `target`: Hydra's rule, where `a.*` allows everything under `a.`."""
    return isinstance(target, str) and any(
        target.startswith(pattern[:-1]) if pattern.endswith(".*") else target == pattern
        for pattern in TRUSTED_TARGETS)


class ConfigError(ValueError):
    """A config value outside its allowed range; the message is one line naming the key."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class Check(NamedTuple):
    """One range check: `key` (relative to its group) must satisfy `ok`; `allowed` says what it must be."""

    key: str
    value: Any
    ok: bool
    allowed: str


FRACTION = "a fraction in [0, 1)"


def at_least(key: str, value, low: int) -> Check:
    return Check(key, value, value >= low, f"an integer >= {low}")


def instantiable(key: str, node) -> Check:
    """A node instantiate will build: a mapping whose `_target_` is among TRUSTED_TARGETS (train.py passes them)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return Check(f"{key}._target_", target, trusted(target), f"a callable in {', '.join(TRUSTED_TARGETS)}")


def refuse_first(checks: list[Check]) -> None:
    """ConfigError for the first check that fails: `<key>=<value> is not allowed: must be <allowed>`."""
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value} is not allowed: must be {allowed}", key=key)
