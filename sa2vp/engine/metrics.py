"""Classification metrics from a confusion matrix: top-1 and mean per-class accuracy (VTAB/FGVC report
top-1; mean per-class is the fair figure on unbalanced splits)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.engine.runtime import Precision


@dataclass(frozen=True)
class Metrics:
    """Accuracies of one split; `confusion[i, j]` counts images of class i predicted as j."""

    confusion: np.ndarray

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        return float(np.trace(self.confusion) / max(1, self.count))

    @property
    def per_class(self) -> np.ndarray:
        """Accuracy of each class (NaN for a class with no image in the split)."""
        support = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(support > 0, np.diag(self.confusion) / support, np.nan)

    @property
    def mean_class(self) -> float:
        """Mean of the per-class accuracies over the classes present in the split."""
        values = self.per_class
        return float(np.nanmean(values)) if np.any(~np.isnan(values)) else 0.0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}top1": self.top1, f"{prefix}mean_class": self.mean_class}

    def per_class_rows(self, classes: Sequence[str]) -> list[dict[str, object]]:
        support = self.confusion.sum(axis=1)
        return [
            {
                "class": name,
                "support": int(support[i]),
                "correct": int(self.confusion[i, i]),
                "accuracy": None if support[i] == 0 else float(self.confusion[i, i] / support[i]),
            }
            for i, name in enumerate(classes)
        ]


def confusion_from(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> np.ndarray:
    index = targets.to(torch.int64) * num_classes + predictions.to(torch.int64)
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy()


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    precision: Precision,
    progress: Progress = NO_PROGRESS,
    description: str = "evaluating",
    *,
    combine: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Metrics:
    """Top-1 predictions of `model` (eval mode) over `loader`, as a confusion matrix. `combine`: what makes the
    whole split's matrix of this process's (under torchrun, each evaluates a shard: the ranks' sum)."""
    was_training = model.training
    model.eval()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    try:
        with progress(description, len(loader), "batches") as advance:
            for images, targets in loader:
                with precision.autocast(device):
                    logits = model(images.to(device, non_blocking=True))
                confusion += confusion_from(targets, logits.argmax(dim=1).cpu(), num_classes)
                advance(1)
    finally:
        model.train(was_training)
    return Metrics(confusion if combine is None else combine(confusion))
