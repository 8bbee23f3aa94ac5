"""Pretraining: the backbone's architecture trained from scratch, with a temporary linear head, on the source task.

All weights are trained (AdamW with the engine's parameter groups, a warm-up/hold/cool-down schedule, clipped
gradients, label smoothing, optional patch dropout); the head is removed afterwards and the held-out accuracy of
the whole classifier is reported with the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import timm
import torch
from torch import nn

from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.engine.optim import WarmupHoldCooldown, adamw
from sa2vp.errors import BackboneError
from sa2vp.models.backbones import data_config, timm_kwargs
from sa2vp.pretraining.source_task import GlyphTask, held_out, make_task, training_batches
from sa2vp.settings import BackboneSettings, PretrainSettings

_GRAD_CLIP = 1.0
# beta2 0.95 rather than AdamW's 0.999: the second-moment estimate keeps up with the fast-changing gradients of
# a short run from scratch (measured: clearly better source and probe accuracy for the same steps).
_BETAS = (0.9, 0.95)
# Trained here (unlike in the frozen backbone), but not decayed: the usual ViT recipe.
_NO_DECAY = ("cls_token", "pos_embed", "reg_token")


@dataclass
class Pretrained:
    """A backbone pretrained on the source task (classifier removed, eval mode) and its held-out accuracy."""

    model: nn.Module
    source_accuracy: float


def pretrain(settings: BackboneSettings, progress: Progress = NO_PROGRESS) -> Pretrained:
    """Train `settings.name` from scratch (all weights, with a temporary linear head) on the glyph task, then
    measure its accuracy on held-out renderings."""
    config = settings.pretrain
    task = make_task(config)
    with _torch_threads(config.threads):
        # Seeded initialisation and patch dropout, without resetting the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = _build(settings, num_classes=task.num_classes)
            size, mean, std = input_geometry(model)
            _train(model, task, config, size, mean, std, progress)
        if config.patch_drop > 0:
            model.patch_drop = nn.Identity()  # as built without patch dropout: the backbone sees every token
        images, labels = held_out(task, config, size)
        accuracy = accuracy_on(model, normalise(images, mean, std), labels)
    _drop_head(model)
    return Pretrained(model.eval(), accuracy)


def input_geometry(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(side, mean, std) of the model's input as built (`backbones.data_config`): the source task's images are
    rendered at that side."""
    config = data_config(model)
    _, height, width = config["input_size"]
    if height != width:
        raise BackboneError(f"the source task renders square images; the backbone's input is {(height, width)}")
    return int(height), tuple(config["mean"]), tuple(config["std"])


def normalise(ink: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Grey ink images (N, H, W) in [0, 1] → the backbone's normalised RGB input (N, 3, H, W)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (ink.unsqueeze(1).expand(-1, len(mean), -1, -1) - mean_t) / std_t


def accuracy_on(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of a classifier on normalised images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / max(len(labels), 1)


def optimizer_and_schedule(
    model: nn.Module, config: PretrainSettings, steps_per_epoch: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over all of `model`'s weights and its per-step warm-up/hold/cool-down over `config.epochs` epochs."""
    optimizer = adamw(model.named_parameters(), config.lr, config.weight_decay, _BETAS, _NO_DECAY)
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    schedule = WarmupHoldCooldown(total, warmup, config.cooldown)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (None: left as it is) for the block, then restored."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(settings: BackboneSettings, num_classes: int) -> nn.Module:
    kwargs = timm_kwargs(settings, num_classes)
    if settings.pretrain.patch_drop > 0:
        kwargs["patch_drop_rate"] = settings.pretrain.patch_drop
    try:
        return timm.create_model(settings.name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BackboneError(f"backbone: cannot build {settings.name!r} with {kwargs}: {exc}") from exc


@runtime_checkable
class _Headed(Protocol):
    """A timm model's way of replacing its classifier."""

    def reset_classifier(self, num_classes: int) -> None: ...


def _drop_head(model: nn.Module) -> None:
    """Remove the source task's classifier: the backbone ends in its features, as built with num_classes=0."""
    if not isinstance(model, _Headed):
        raise BackboneError(f"backbone: {type(model).__name__} has no reset_classifier to remove its head with")
    model.reset_classifier(0)


def _train(
    model: nn.Module,
    task: GlyphTask,
    config: PretrainSettings,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    progress: Progress,
) -> None:
    per_epoch = task.num_classes * config.images_per_class
    steps_per_epoch = math.ceil(per_epoch / config.batch_size)
    total = config.epochs * steps_per_epoch
    optimizer, schedule = optimizer_and_schedule(model, config, steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    description = f"pretraining on {config.epochs} × {per_epoch:,} generated glyphs"
    with progress(description, total, "steps") as advance:
        for epoch in range(config.epochs):
            for ink, labels in training_batches(task, config, size, epoch):
                loss = loss_fn(model(normalise(ink, mean, std)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), _GRAD_CLIP)  # steadies the first steps from scratch
                optimizer.step()
                schedule.step()
                advance(1)
