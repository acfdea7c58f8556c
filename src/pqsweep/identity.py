"""What shapes a result, declared once: every config field says on its schema which stages it shapes, and every stage
key, a study's fixed settings, a run's params and the sweeper's late keys are derived from those declarations.

A field is declared with one of (each a dataclass `field` carrying its declaration as metadata):
- `shapes(stage, ...)`: changing it changes what those stages compute, so their keys, the keys of every stage built
  on them, a study's identity (where the stages lead to a trial) and the params of the runs they lead to;
- `label`: describes the run and shapes nothing: logged as a param (`scale`, whose values sit resolved in the fields
  it sets);
- `fact`: what an option file states about its own method or data, read by the checks (a model's min_image_size);
- `place`: where something is read or kept (a data root, the cache, the stores);
- `record`: how a run is recorded or shown (the MLflow experiment, log_model, the study's name);
- `sweeper`: bookkeeping pqsweep's sweeper sets for a trial it launches (`launch.*`), never a setting.

A stage (pqsweep.stages.STAGES) is a named step with the stages its key builds on; its key hashes their keys and the
resolved values of the fields that shape it, grouped as they sit in the config ({"model": {...}, "device": ...}).
Nothing here imports torch: the pre-run check and the sweeper derive keys and late keys without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from omegaconf import MISSING, DictConfig, OmegaConf

from pqsweep.stages import STAGES, upstream

# -- the declarations ---------------------------------------------------------------------------------------------


class Role(str, Enum):
    shapes = "shapes"
    label = "label"
    fact = "fact"
    place = "place"
    record = "record"
    sweeper = "sweeper"


@dataclass(frozen=True)
class Declared:
    role: Role
    stages: tuple[str, ...] = ()
    key: Callable[[Any], Any] | None = None  # how the value enters a key, where not as it is (a file: its content)
    # A field added after cache entries were first written: at its schema default, which does what pqsweep did
    # before the field existed, it enters no key, so every entry made before it stays valid.
    added: bool = False


METADATA = "pqsweep"


def _field(declared: Declared, default: Any, factory: Callable[[], Any] | None) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={METADATA: declared})
    return dataclasses.field(default=default, metadata={METADATA: declared})


def shapes(*stages: str, default: Any = MISSING, factory: Callable[[], Any] | None = None,
           key: Callable[[Any], Any] | None = None, added: bool = False) -> Any:
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise ValueError(f"shapes({', '.join(stages)}): name stages among {', '.join(STAGES)}")
    if added and default is MISSING and factory is None:
        raise ValueError("shapes(..., added=True) needs a default: the value that does what pqsweep did before")
    return _field(Declared(Role.shapes, stages, key, added), default, factory)


def _role(role: Role):
    def declare(default: Any = MISSING, factory: Callable[[], Any] | None = None) -> Any:
        return _field(Declared(role), default, factory)

    declare.__name__ = role.value
    return declare


label, fact, place, record, sweeper = (_role(r) for r in (Role.label, Role.fact, Role.place, Role.record,
                                                           Role.sweeper))


# Keys in a form that does not change where the result does not: a file by its content, a device by its kind.
def file_content(value: Any) -> Any:
    """A file's path enters a key by what the file holds: edited in place, the key changes; moved, it does not."""
    path = Path(value).expanduser() if isinstance(value, str) and value else None
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else value


def device_kind(value: str) -> str:
    """cuda:0 and cuda:1 train the same model."""
    return value.split(":")[0]


def sorted_floats(value) -> list[float]:
    return sorted(float(v) for v in value)


class UndeclaredField(TypeError):
    """A schema field that does not say what it shapes: every key derived from the schema would be a guess."""


def declaration(schema: type, name: str) -> Declared:
    for f in dataclasses.fields(schema):
        if f.name == name:
            if METADATA not in f.metadata:
                raise UndeclaredField(f"{schema.__name__}.{name} declares no role: use shapes(...), label, fact, "
                                      f"place, record or sweeper (pqsweep.identity)")
            return f.metadata[METADATA]
    raise KeyError(f"{schema.__name__} has no field {name}")


class Leaf(NamedTuple):
    path: tuple[str, ...]  # ("train", "epochs"), or ("device",) for a top-level field
    declared: Declared
    value: Any  # resolved, enums as their members
    default: Any = MISSING  # the schema's default (MISSING where it has none)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is dataclasses.MISSING:
        return MISSING
    made = f.default_factory()
    return dataclasses.asdict(made) if dataclasses.is_dataclass(made) else made  # a node, as its resolved value is


def at_default(leaf: Leaf) -> bool:
    """Whether an `added` field holds its schema default (enums compared by value), so it stays out of keys."""
    default = leaf.default.value if isinstance(leaf.default, Enum) else leaf.default
    value = leaf.value.value if isinstance(leaf.value, Enum) else leaf.value
    return leaf.declared.added and default is not MISSING and value == default


def _resolved(cfg: DictConfig, name: str, enum_to_str: bool = False) -> Any:
    """A root field's value, resolved: never the whole config, whose `hydra` node may not resolve outside a job."""
    node = cfg[name]
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=enum_to_str)
    return node.value if enum_to_str and isinstance(node, Enum) else node


def leaves(cfg: DictConfig) -> Iterator[Leaf]:
    """Every declared field of a composed config: the root's own fields, and each group's under its schema."""
    root = OmegaConf.get_type(cfg)
    for f in dataclasses.fields(root):
        node = cfg.get(f.name)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is not None and dataclasses.is_dataclass(schema):
            values = _resolved(cfg, f.name)
            for inner in dataclasses.fields(schema):
                yield Leaf((f.name, inner.name), declaration(schema, inner.name), values[inner.name], _default(inner))
        else:
            yield Leaf((f.name,), declaration(root, f.name), _resolved(cfg, f.name), _default(f))


# -- what is derived ----------------------------------------------------------------------------------------------


def digest(shaping: dict[str, Any]) -> str:
    blob = json.dumps(shaping, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_keys(cfg: DictConfig) -> dict[str, str | None]:
    """Each stage's key, None where the stage does not apply to this run."""
    own: dict[str, dict[str, Any]] = {name: {} for name in STAGES}
    for leaf in leaves(cfg):
        if at_default(leaf):
            continue
        value = leaf.declared.key(leaf.value) if leaf.declared.key else leaf.value
        for stage in leaf.declared.stages:
            if len(leaf.path) == 1:
                own[stage][leaf.path[0]] = value
            else:
                own[stage].setdefault(leaf.path[0], {})[leaf.path[1]] = value
    keys: dict[str, str | None] = {}
    for name, stage in STAGES.items():  # declared in dependency order
        if not stage.applies(cfg):
            keys[name] = None
            continue
        built_on = {up: keys[up] for up in stage.after if keys[up] is not None}
        keys[name] = digest({**built_on, **own[name]})
    return keys


def stage_key(cfg: DictConfig, name: str) -> str | None:
    return stage_keys(cfg)[name]


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, into)
    else:
        into[prefix] = value


def flat(cfg: DictConfig, keep: Callable[[Declared], bool]) -> dict[str, Any]:
    """The resolved values (enums as strings) of the fields `keep` accepts, as dot keys; a mapping's own keys too."""
    found: dict[str, Any] = {}
    for leaf in leaves(cfg):
        if keep(leaf.declared):
            value = _resolved(cfg, leaf.path[0], enum_to_str=True)
            _flatten(".".join(leaf.path), value if len(leaf.path) == 1 else value[leaf.path[1]], found)
    return found


def leads_to(stage: str) -> Callable[[Declared], bool]:
    """Fields that shape `stage` or a stage it builds on."""
    before = upstream(stage)
    return lambda declared: bool(set(declared.stages) & before)


def fixed_settings(cfg: DictConfig, swept=()) -> dict[str, str]:
    """What a study holds fixed: every field that shapes its trials or the study itself, less the swept keys."""
    swept = tuple(swept)
    settings = flat(cfg, leads_to("study"))
    return {k: json.dumps(v) for k, v in settings.items()
            if not any(k == s or k.startswith(s + ".") for s in swept)}


def compared(cfg: DictConfig, keys) -> list[str]:
    """Those of a study's stored fixed settings that are part of its identity under today's declarations: they lie
    under a field that leads to the study. A study stored before a field became a fact (or was removed) resumes."""
    paths = [leaf.path for leaf in leaves(cfg) if leads_to("study")(leaf.declared)]
    return [k for k in keys if any(tuple(k.split("."))[:len(path)] == path for path in paths)]


def defaults(cfg: DictConfig) -> dict[str, str]:
    """Each identity field's schema default, as fixed_settings writes values. A field added to pqsweep after a study
    was stored is missing from it; at its default it does what pqsweep did before it existed (a new field's default
    keeps the old behaviour), so the study resumes."""
    found = {}
    for leaf in leaves(cfg):
        if leads_to("study")(leaf.declared) and leaf.default is not MISSING and leaf.default != MISSING:
            default = leaf.default.value if isinstance(leaf.default, Enum) else leaf.default
            plain: dict[str, Any] = {}
            _flatten(".".join(leaf.path), default, plain)  # a node (train.distill) as its fields, as flat() writes it
            found.update({k: json.dumps(v) for k, v in plain.items()})
    return found


def params(cfg: DictConfig, stage: str = "trial") -> dict[str, str]:
    """What a run of `stage` logs as params: the fields that lead to it, and the labels."""
    chosen = flat(cfg, lambda d: d.role == Role.label or leads_to(stage)(d))
    return {k: str(v)[:6000] for k, v in chosen.items()}


EARLY = upstream("prune")  # what a prune stage is built from: keys that change none of it are late


def is_late(cfg: DictConfig, key: str) -> bool:
    """A swept key whose every field shapes only stages after the prune stage (quantization, measure, export): a
    grid varies it fastest, so points that share a prune stage run one after another and compute it once."""
    parts = tuple(key.split("."))
    found = [leaf for leaf in leaves(cfg) if leaf.path[:len(parts)] == parts or parts[:len(leaf.path)] == leaf.path]
    return bool(found) and not any(set(leaf.declared.stages) & EARLY for leaf in found)


def swept_shaping(cfg: DictConfig, swept, stage: str) -> tuple[str, ...]:
    """The swept keys whose fields shape `stage` or a stage it builds on: points that agree on these share its
    cache entry (the sweeper's estimate of the time left counts a stage once per such group)."""
    before = upstream(stage)
    found = []
    for key in swept:
        parts = tuple(key.split("."))
        near = [leaf for leaf in leaves(cfg) if leaf.path[:len(parts)] == parts or parts[:len(leaf.path)] == leaf.path]
        # a key no schema field holds (a group's option, an added key): assumed to shape everything
        if not near or any(set(leaf.declared.stages) & before for leaf in near):
            found.append(key)
    return tuple(found)
