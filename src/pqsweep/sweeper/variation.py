"""A variation of a sweep file gets a study of its own, so the file's study (and its paper's name) stays free.

`pqsweep -m sweep=X dataset=digits train.epochs=1` holds other settings than `pqsweep -m sweep=X` does; under the
file's own name it would take study X, and the plain command would then be refused (a study holds one set of fixed
settings, pqsweep.sweeper.study.check_identity). So when a command (1) runs a sweep file, (2) leaves study.name as
the file sets it, and (3) holds fixed settings (pqsweep.identity.fixed_settings) other than the file's own, or
sweeps keys the file does not, its study is named after the difference:

    mnist_cnn_sparsity_x_precision@dataset-digits+epochs-1.5c0e2a

the file's name, `@`, the differing settings as `<group>-<option>` or `<field>-<value>` (cut to 40 characters), and
six hex digits of the hash of the differing settings' values, so two variations never share a study and the same
command always finds its own again (a resume). Only characters Hydra's override grammar takes unquoted are used:
`study.name=<that name>` names the same study by hand. The file's "own" settings are those of `sweep=X` alone, with
the command's `scale=` (a scale is already in the file's name: scale=paper is the paper's study, not a variation).
A study.name typed on the command line is always taken as typed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from hydra.types import RunMode
from omegaconf import DictConfig

from pqsweep import identity
from pqsweep.sweeper.space import SEED

log = logging.getLogger(__name__)

NAMING = ("study.name", "hydra.sweeper.study_name")  # typed: the command names its study itself
# the reference command: the sweep file, at the command's scale, found where the command finds it
KEPT = ("sweep", "scale", "hydra.searchpath")


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def typed(config: DictConfig) -> list[str]:
    """The command line's overrides: Hydra keeps those of its own node (hydra.*) apart."""
    return [*config.hydra.overrides.hydra, *config.hydra.overrides.task]


def typed_name(config: DictConfig) -> bool:
    """Whether the command line sets the study's name."""
    return any(key_of(o) in NAMING for o in typed(config))


def reference_overrides(config: DictConfig) -> list[str]:
    return [o for o in typed(config) if key_of(o) in KEPT]


def token(text: str) -> str:
    """`text` in the characters a study name keeps (Hydra's unquoted override values, file names)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_")[:16]


def suffix(differing: dict[str, str], choices: dict[str, str], extra: list[str]) -> str:
    """`@<readable>.<hash>` for the settings this command holds (`differing`: key -> its JSON value, absent:
    unset) and the keys it sweeps beyond the file (`extra`)."""
    tokens: list[str] = []
    for key in sorted(differing):
        group, field = key.split(".", 1)[0], key.rsplit(".", 1)[-1]
        if group in choices:  # a group's option changed: every field under it differs; its name says it
            item = f"{group}-{token(choices[group])}"
        else:
            item = f"{field}-{token(str(json.loads(differing[key])) if differing[key] else 'unset')}"
        if item not in tokens:
            tokens.append(item)
    tokens += [f"{token(k.rsplit('.', 1)[-1])}-swept" for k in extra]
    readable = "+".join(tokens)
    if len(readable) > 40:
        readable = readable[:40].rsplit("+", 1)[0] + "+more"
    blob = json.dumps({"fixed": differing, "swept": sorted(extra)}, sort_keys=True)
    return f"@{readable}.{hashlib.sha256(blob.encode()).hexdigest()[:6]}"


def differences(current: dict[str, str], reference: dict[str, str]) -> dict[str, str]:
    """The settings that differ, with this command's value ("" where it has none)."""
    return {k: current.get(k, "") for k in sorted(current.keys() | reference.keys())
            if current.get(k) != reference.get(k)}


def name_for(plugin, name: str, swept: list[str]) -> tuple[str, str]:
    """(the study's name, why it is not `name`: "" when it is). `swept`: the command's swept keys."""
    config = plugin.config
    sweep_file = config.hydra.runtime.choices.get("sweep")
    if sweep_file in (None, "null") or typed_name(config):
        return name, ""
    try:
        reference = plugin.hydra_context.config_loader.load_configuration(
            config_name=config.hydra.job.config_name, overrides=reference_overrides(config), run_mode=RunMode.MULTIRUN)
        if reference.study.name != name:  # the command's name is not the file's own (an interpolation it changed)
            return name, ""
        held = identity.fixed_settings(reference, swept)
    except Exception:  # noqa: BLE001 - the file alone does not compose (it needs a value the command gives): as before
        log.debug("sweep=%s alone does not compose; the study keeps the file's name", sweep_file, exc_info=True)
        return name, ""
    differing = differences(identity.fixed_settings(config, swept), held)
    extra = [k for k in swept if k not in (reference.hydra.sweeper.params or {}) and k != SEED]
    if not differing and not extra:
        return name, ""
    choices = {g: str(c) for g, c in config.hydra.runtime.choices.items()
               if reference.hydra.runtime.choices.get(g) != c and "/" not in g}
    variation = name + suffix(differing, choices, extra)
    shown = ", ".join(dict.fromkeys(k.split(".", 1)[0] if k.split(".", 1)[0] in choices else k for k in differing))
    why = " and ".join(part for part in (f"holds other {shown}" if shown else "",
                                         f"also sweeps {', '.join(extra)}" if extra else "") if part)
    return variation, (f"study {variation}: this command {why} than sweep={sweep_file}, so it runs in a study of its "
                       f"own and `pqsweep -m sweep={sweep_file}` keeps study {name} (study.name=<name> names it "
                       f"yourself)")
