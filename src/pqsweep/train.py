"""Training and fine-tuning loops (plain PyTorch, one progress bar per phase)."""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pqsweep.config import TRUSTED_TARGETS


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(
    model: nn.Module,
    loader: DataLoader,
    train_cfg,
    epochs: int,
    lr: float | None = None,
    device: str = "cpu",
    after_step: Callable[[], None] | None = None,
    desc: str = "train",
) -> list[float]:
    """Train `epochs` epochs with the configured optimizer (and scheduler); returns the mean loss per epoch.

    `lr` overrides the optimizer's learning rate (fine-tuning); `after_step` runs after every optimizer step
    (fine-tuning re-applies pruning masks there, so pruned weights stay zero).
    """
    if epochs == 0:
        return []
    model.to(device).train()
    overrides = {"lr": lr} if lr is not None else {}
    trusted = {"_execution_whitelist_": TRUSTED_TARGETS}
    optimizer = instantiate(train_cfg.optimizer, params=model.parameters(), **overrides, **trusted)
    scheduler = instantiate(train_cfg.scheduler, optimizer=optimizer, **trusted) if train_cfg.scheduler else None
    loss_fn = nn.CrossEntropyLoss()
    history = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False)
    for _ in bar:
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.item() * len(y)
            count += len(y)
        if scheduler is not None:
            scheduler.step()
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history
