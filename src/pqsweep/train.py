"""Training and fine-tuning loops (plain PyTorch, one progress bar per phase)."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from pqsweep import console
from pqsweep.checks import TRUSTED_TARGETS, ConfigError
from pqsweep.weights import apply_masks, zero_masks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainable_parameters(model: nn.Module, prefixes) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter under one of the module names `prefixes` (train.trainable); all of them
    where `prefixes` is null or empty. A prefix names a module: `fc` holds fc.weight and fc.bias, not fc2.weight."""
    named = list(model.named_parameters())
    if not prefixes:
        return named
    return [(name, p) for name, p in named if any(name == k or name.startswith(k + ".") for k in prefixes)]


def freeze_all_but(model: nn.Module, prefixes) -> list[nn.Parameter]:
    """Set requires_grad on the parameters train.trainable names and clear it on all others; returns the former.

    Only parameters freeze: a frozen layer's BatchNorm still updates its running statistics in train mode, as
    requires_grad=False does in plain PyTorch (000's recipe)."""
    chosen = trainable_parameters(model, prefixes)
    names = {name for name, _ in chosen}
    unmatched = [k for k in prefixes or () if not any(n == k or n.startswith(k + ".") for n in names)]
    if unmatched:
        modules = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
        raise ConfigError(f"train.trainable={list(prefixes)} is not allowed: must be module names of the model "
                          f"(top level: {', '.join(modules)}); {', '.join(unmatched)} names no parameter",
                          key="train.trainable")
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return [p for _, p in chosen]


def batches(loader: DataLoader, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly `n` batches of `loader`, going round it again where it holds fewer (each pass reshuffled)."""
    drawn = 0
    while drawn < n:
        before = drawn
        for batch in loader:
            yield batch
            drawn += 1
            if drawn == n:
                return
        if drawn == before:
            raise ValueError("the training loader gave no batches")


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, loader: DataLoader, n: int, device: str = "cpu") -> int:
    """BatchNorm's running statistics recomputed from `n` training batches (EagleEye's adaptive BN): each BN layer
    reset, then its cumulative average (momentum None) taken over the batches in train mode, with no gradient and no
    weight changed. Returns how many BatchNorm layers it re-estimated; the model keeps its mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or n == 0:
        return 0
    momenta = [m.momentum for m in norms]
    training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.to(device).train()
    try:
        for x, _ in batches(loader, n):
            model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(training)
    return len(norms)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """(1 - alpha) CE(logits, labels) + alpha T^2 KL(softmax(teacher / T) || softmax(logits / T)) (Hinton et al.:
    T^2 keeps the soft term's gradients at the hard term's scale as T grows)."""
    hard = F.cross_entropy(logits, labels)
    soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft


def last_linear(model: nn.Module) -> nn.Module:
    """The model's classifier: its last nn.Linear (a QAT Linear too)."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError("train.distill.feature: the model has no nn.Linear whose inputs are its features")
    return heads[-1]


class Distiller:
    """The loss of a distilled step (train.distill): the logits term against the teacher's, plus, where `feature`
    > 0, that weight times the mean squared difference of the classifier's inputs (the penultimate features) of
    student and teacher, which align where compression kept the feature width (unstructured pruning, quantization)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, distill):
        self.teacher, self.distill = teacher.eval(), distill
        self.features: dict[str, torch.Tensor] = {}
        self.hooks = []
        if distill.get("feature", 0.0) > 0:
            for role, net in (("student", student), ("teacher", teacher)):
                self.hooks.append(last_linear(net).register_forward_hook(
                    lambda module, args, out, role=role: self.features.__setitem__(role, args[0])))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            taught = self.teacher(x)
        loss = distillation_loss(model(x), taught, y, self.distill.alpha, self.distill.temperature)
        if self.hooks:
            student, teacher = self.features["student"], self.features["teacher"]
            if student.shape != teacher.shape:
                raise ValueError(f"train.distill.feature={self.distill.feature}: the student's features "
                                 f"{tuple(student.shape[1:])} no longer align with the teacher's "
                                 f"{tuple(teacher.shape[1:])}: use 0 with pruning that removes channels")
            loss = loss + self.distill.feature * F.mse_loss(student, teacher)
        return loss

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


class Diverged(RuntimeError):
    """Training went non-finite (its loss, or a weight at the end): one line saying which phase, epoch and step. The
    settings that shaped it determine it, so the stage records it and fails every trial that needs it at once."""


def fit(
    model: nn.Module,
    loader: DataLoader,
    train_cfg,
    epochs: int,
    lr: float | None = None,
    device: str = "cpu",
    after_step: Callable[[], None] | None = None,
    desc: str = "train",
    teacher: nn.Module | None = None,
    start_epoch: int = 0,
    before_step: Callable[[], None] | None = None,
    after_epoch: Callable[[nn.Module, int, int], None] | None = None,
) -> list[float]:
    """Train `epochs` epochs with the configured optimizer (and scheduler); returns the mean loss per epoch.

    `lr` overrides the optimizer's learning rate (fine-tuning); `after_step` runs after every optimizer step
    (fine-tuning re-applies pruning masks there, so pruned weights stay zero). With a `teacher`, each step's loss
    is the distillation loss of train.distill against the teacher's logits (its forward pass only, in eval mode).
    `start_epoch` k starts the scheduler where the baseline's was after k epochs (rewinding's retraining).
    `before_step` runs between the backward pass and the optimizer step (a sparse-learning regulariser).
    `after_epoch(model, done, epochs)` runs after each epoch (study.early_stop watches the curve there).
    """
    if epochs == 0:
        return []
    model.to(device).train()
    overrides = {"lr": lr} if lr is not None else {}
    trusted = {"_execution_whitelist_": TRUSTED_TARGETS}
    # Plain resolved dicts: instantiate deep-copies a config node together with its whole root config (to resolve
    # interpolations), 5-60 ms per call here, a tenth of a one-epoch fine-tuning of the cnn on mnist5k.
    params = freeze_all_but(model, train_cfg.get("trainable"))  # the optimizer steps only what trains
    optimizer = instantiate(_resolved(train_cfg.optimizer), params=params, **overrides, **trusted)
    scheduler = instantiate(_resolved(train_cfg.scheduler), optimizer=optimizer, **trusted) \
        if train_cfg.scheduler else None
    if scheduler is not None and start_epoch:
        with warnings.catch_warnings():  # stepped before any optimizer step, on purpose: to epoch k's rate
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for _ in range(start_epoch):
                scheduler.step()
    distiller = Distiller(model, teacher.to(device), train_cfg.distill) if teacher is not None else None
    plain = nn.CrossEntropyLoss()
    try:
        history = _epochs(model, loader, optimizer, scheduler, epochs, desc, device,
                          distiller or (lambda net, x, y: plain(net(x), y)), before_step, after_step, after_epoch)
    finally:
        if distiller is not None:
            distiller.close()
    model.eval()
    unfinished = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if unfinished is not None:
        raise Diverged(f"{desc}: {unfinished} holds non-finite values after {console.plural(epochs, 'epoch')}; lower the learning rate")
    return history


def _epochs(model, loader, optimizer, scheduler, epochs, desc, device, loss_of, before_step, after_step, after_epoch):
    """fit's loop, each step's loss `loss_of(model, x, y)`; returns the mean loss of each epoch."""
    history = []
    with console.bar(range(epochs), desc=desc, unit="epoch") as bar:
        for epoch in bar:
            total, count = 0.0, 0
            for step, (x, y) in enumerate(loader, 1):
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(model, x, y)
                value = loss.item()
                if not math.isfinite(value):
                    raise Diverged(f"{desc}: the loss was {value} at epoch {epoch + 1} of {epochs}, step {step}; "
                                   f"lower the learning rate")
                loss.backward()
                if before_step is not None:
                    before_step()
                optimizer.step()
                if after_step is not None:
                    after_step()
                total += value * len(y)
                count += len(y)
            if scheduler is not None:
                scheduler.step()
            history.append(total / count)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if after_epoch is not None:
                after_epoch(model, epoch + 1, epochs)
    return history


def _resolved(node):
    """A config node as a plain container, its interpolations (e.g. `T_max: ${train.epochs}`) resolved."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@dataclass
class Context:
    """What a pruner or quantizer may use besides the model and its own config group."""

    loaders: dict[str, DataLoader]  # train / val / test; quantizers calibrate on `train`
    example: torch.Tensor  # one batch-1 input: graph tracing, dependency graphs, MACs
    train_cfg: object  # the `train` config group
    device: str = "cpu"
    initial_state: dict | None = None  # the model's weights at initialisation (rewind=reinit)
    teacher: nn.Module | None = None  # the trial's baseline, where train.distill is enabled
    rewind: str = "finetune"  # pruning.rewind: what `retrain` does after a pruning step
    rewind_epoch: int = 0  # pruning.rewind_epoch
    rewind_state: dict | None = None  # the baseline's weights at rewind_epoch (rewind=weights)
    monitor: object | None = None  # study.early_stop's pqsweep.early_stop.Monitor, in a sweep's trial
    epochs_run: int = 0  # fine-tune epochs this process ran (the run's tag finetune_epochs_run)

    def after_epoch(self, model: nn.Module, done: int, epochs: int) -> None:
        self.epochs_run += 1
        if self.monitor is not None:
            self.monitor.epoch(model, done, epochs, self.epochs_run)

    def finetune_lr(self) -> float:
        return self.train_cfg.finetune_lr  # resolved in the config: a tenth of the optimizer's lr unless set

    def finetune(self, model: nn.Module, epochs: int | None = None, lr: float | None = None,
                 desc: str = "finetune") -> list[float]:
        """Fine-tune `model` (default: train.finetune_epochs at the fine-tuning rate) holding every prunable weight
        that is zero now at zero, so pruned weights stay pruned; its BatchNorm statistics re-estimated first where
        train.bn_batches asks, and distilled from the teacher where train.distill does. Leaves the model on the CPU
        in eval mode."""
        epochs = self.train_cfg.finetune_epochs if epochs is None else epochs
        self.recalibrate(model)
        masks = zero_masks(model)
        history = fit(model, self.loaders["train"], self.train_cfg, epochs, lr=lr or self.finetune_lr(),
                      device=self.device, after_step=lambda: apply_masks(model, masks), desc=desc,
                      teacher=self.teacher if self.train_cfg.distill.enabled else None, after_epoch=self.after_epoch)
        model.cpu().eval()
        return history

    def retrain(self, model: nn.Module, desc: str = "retrain") -> list[float]:
        """After a pruning step, as pruning.rewind says: weights rewound to the baseline's epoch k (rewind=weights)
        or kept (rewind=lr), then trained train.epochs - k epochs at the optimizer's own rate and the schedule from
        epoch k, pruned weights held at zero; rewind=finetune (and reinit, which its pruner rewinds itself) fine-tunes.
        Leaves the model on the CPU in eval mode."""
        if self.rewind not in ("weights", "lr"):
            return self.finetune(model, desc=desc)
        masks = zero_masks(model)
        if self.rewind == "weights":
            if self.rewind_state is None:
                raise ValueError("pruning.rewind=weights: needs the baseline's weights at rewind_epoch (rewind_state)")
            model.load_state_dict(self.rewind_state)
            apply_masks(model, masks)
        self.recalibrate(model)
        history = fit(model, self.loaders["train"], self.train_cfg, self.train_cfg.epochs - self.rewind_epoch,
                      device=self.device, after_step=lambda: apply_masks(model, masks), desc=desc,
                      teacher=self.teacher if self.train_cfg.distill.enabled else None, start_epoch=self.rewind_epoch,
                      after_epoch=self.after_epoch)
        model.cpu().eval()
        return history

    def recalibrate(self, model: nn.Module) -> int:
        """train.bn_batches of BatchNorm re-estimation (none at 0); returns the BatchNorm layers re-estimated."""
        return reestimate_batchnorm(model, self.loaders["train"], self.train_cfg.bn_batches, self.device)
