"""Optimisers and learning-rate schedules: AdamW with weight decay on matrices only, and two per-step schedules.

The trainer uses the release's recipe (method file §4): `build_optimizer`, and `build_scheduler` — linear warm-up
from 0, then a cosine down to a minimum learning rate. The offline backbone's pretraining (sa2vp.pretraining)
uses the same parameter groups (`adamw`) with a warm-up, hold and linear cool-down (`WarmupHoldCooldown`).
Schedules are plain objects (not closures) so that LambdaLR's state_dict can save them with a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sa2vp.settings import TrainSettings


def param_groups(
    parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float, no_decay_names: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """The decayed and the undecayed parameters, in that order, empty groups left out. Biases, norms, scales and
    other 1-D tensors get no decay, nor do parameters whose name ends with one of `no_decay_names` (a ViT's
    tokens and position embeddings, when they are trained at all)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in parameters:
        (no_decay if param.ndim < 2 or name.endswith(no_decay_names) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def adamw(
    parameters: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    no_decay_names: tuple[str, ...] = (),
) -> torch.optim.AdamW:
    """AdamW over `param_groups(parameters, weight_decay, no_decay_names)`."""
    return torch.optim.AdamW(param_groups(parameters, weight_decay, no_decay_names), lr=lr, betas=betas)


def build_optimizer(parameters: list[tuple[str, nn.Parameter]], settings: TrainSettings) -> torch.optim.AdamW:
    """The trainer's AdamW over the trainable parameters (torch's default betas)."""
    return adamw(parameters, settings.lr, settings.weight_decay)


class WarmupCosine:
    """lr factor at optimiser step s: s/warmup during warm-up, then cosine from 1 to min_lr/lr."""

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


class WarmupHoldCooldown:
    """lr factor at optimiser step s: (s+1)/warmup during warm-up, then 1, then linear down to 0 over the last
    `cooldown` fraction of the steps.

    On a budget of a couple of thousand steps from scratch, holding the peak rate for most of them learns
    clearly faster than a cosine that starts decaying at once (measured on the offline backbone's source task).
    The warm-up counts a step as done when it is taken: the first step already moves at 1/warmup of the peak
    rate, where WarmupCosine's first step has rate 0.
    """

    def __init__(self, total_steps: int, warmup_steps: int, cooldown: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.cooldown_steps = max(1, round(cooldown * total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return min(1.0, max(0.0, (self.total_steps - step) / self.cooldown_steps))
