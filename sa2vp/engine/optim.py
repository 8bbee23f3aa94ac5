"""The release's optimiser and schedule (method file §4): AdamW with weight decay on weights of >= 2
dimensions only, linear warm-up from 0, then a per-step cosine down to a minimum learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from sa2vp.settings import TrainSettings


def build_optimizer(parameters: list[tuple[str, nn.Parameter]], settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases, norms, scales and other 1-D tensors get no decay."""
    decay = [p for _, p in parameters if p.ndim >= 2]
    no_decay = [p for _, p in parameters if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)


class WarmupCosine:
    """lr factor at optimiser step s: s/warmup during warm-up, then cosine from 1 to min_lr/lr.

    A plain object (not a closure) so LambdaLR's state_dict can save it with the checkpoint.
    """

    def __init__(self, total_steps: int, warmup_steps: int, floor: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.floor = floor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over `settings.epochs` epochs of `steps_per_epoch` optimiser steps."""
    total = settings.epochs * steps_per_epoch
    warmup = min(total, round(settings.warmup_epochs * steps_per_epoch))
    floor = min(1.0, settings.min_lr / settings.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup, floor))
