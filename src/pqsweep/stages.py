"""The stages of a run, each declared once: its name, the stages its key builds on, whether it is cached, what random
state it hands on, what its cache entry holds, and when a run has it at all.

Which fields shape a stage is declared on the fields (pqsweep.identity); computing or loading a stage is
`pqsweep.cache.Stages.get(name, compute)`. Adding a stage is one line here, the fields that shape it, and its compute
function in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

from omegaconf import DictConfig, OmegaConf


class Random(str, Enum):
    """What random state a stage hands on to the stages after it, so a result does not depend on whether a stage
    was computed or loaded."""

    none = "none"  # it draws nothing a later stage would see: the state passes through untouched
    kept = "kept"  # the state its computation left: saved with its entry, restored when the entry is loaded
    reseeded = "reseeded"  # torch, numpy and the training loader re-seeded from train.seed after it, either way


def always(cfg: DictConfig) -> bool:
    return True


def has_structured_step(cfg: DictConfig) -> bool:
    """A pruning option whose file names a structured step runs it as a stage of its own (structured_unstructured)."""
    return OmegaConf.select(cfg, "pruning.structured_step", default=None) is not None


def rewinds_weights(cfg: DictConfig) -> bool:
    """pruning.rewind=weights takes the baseline's weights at an earlier epoch: the rewind stage replays them."""
    return str(OmegaConf.select(cfg, "pruning.rewind", default="finetune")).rsplit(".", 1)[-1] == "weights"


@dataclass(frozen=True)
class Stage:
    name: str
    after: tuple[str, ...] = ()  # the stages whose keys enter this one's (those that apply to the run)
    cached: bool = True  # its result is kept under its key in cache.dir
    random: Random = Random.none
    holds: frozenset[str] = frozenset()  # what its cache entry must hold to be read back
    spares: str = "computed nothing"  # what a loaded entry spares, as its log line says
    applies: Callable[[DictConfig], bool] = always  # whether the run has this stage at all


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    # the data set's splits; cached only where a builder holds them in memory (digits, mnist5k); re-seeded after,
    # so a builder that draws from torch leaves the model's initialisation the same whether it ran or was loaded
    Stage("data", random=Random.reseeded, holds=frozenset({"train", "val", "test", "num_classes", "in_channels", "image_size"}),
          spares="built nothing"),
    # the trained dense model; its key predates the stage graph, so its upstream data enters by the fields
    Stage("baseline", random=Random.reseeded, holds=frozenset({"state_dict", "history"}), spares="trained nothing"),
    # measuring draws (each pass over the test loader takes a seed from torch): re-seeded after, measured or loaded
    Stage("baseline_metrics", after=("baseline",), random=Random.reseeded, holds=frozenset({"metrics"}),
          spares="measured nothing"),
    Stage("structured", after=("baseline",), random=Random.kept, holds=frozenset({"state_dict", "structure"}),
          spares="pruned and fine-tuned nothing", applies=has_structured_step),
    # the baseline's weights at epoch pruning.rewind_epoch, replayed from its initialisation, for rewind=weights
    Stage("rewind", after=("baseline",), holds=frozenset({"state_dict"}), spares="replayed nothing",
          applies=rewinds_weights),
    Stage("prune", after=("baseline", "structured", "rewind"), random=Random.kept,
          holds=frozenset({"state_dict", "structure"}), spares="pruned and fine-tuned nothing"),
    # quantize, measure, export: each trial's own, never cached
    Stage("trial", after=("data", "prune", "baseline_metrics"), cached=False),
    # a sensitivity scan's per-layer curves, and the amounts it chooses from them
    Stage("curves", after=("baseline",), random=Random.kept, holds=frozenset({"baseline_top1", "rows", "info"}),
          spares="pruned nothing"),
    Stage("amounts", after=("curves",), cached=False),
    # what a study is: its trials, and the objectives and constraints it searches them by
    Stage("study", after=("trial",), cached=False),
)}


def downstream(names) -> set[str]:
    """The stages built on any of `names`, those included."""
    found = set(names)
    while True:
        more = {s.name for s in STAGES.values() if found & set(s.after)} - found
        if not more:
            return found
        found |= more


def upstream(name: str) -> set[str]:
    """The stages `name` builds on, itself included."""
    found, todo = set(), [name]
    while todo:
        stage = todo.pop()
        if stage not in found:
            found.add(stage)
            todo += STAGES[stage].after
    return found
