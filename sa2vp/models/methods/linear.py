"""Linear probing: the frozen backbone's pooled feature (ViT: the CLS token after the final norm) and a
trained linear head — the baseline every adaptation method must beat (paper Tab. 1)."""

from __future__ import annotations

import torch
from torch import nn

from sa2vp.models.base import AdaptedModel, BackboneClassifier
from sa2vp.settings import FloatRange, ModelSettings, SearchDimension


class LinearProbe(BackboneClassifier):
    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__(backbone.requires_grad_(False), num_classes)

    def describe(self) -> list[str]:
        return [f"linear probe: the head on the frozen backbone's {self.head.in_features}-d pooled feature"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # nothing below the head is trained: skip the backbone's autograd graph
            features = self.features(images)
        return self.head(features)


def build(backbone: nn.Module, num_classes: int, settings: ModelSettings) -> AdaptedModel:
    return LinearProbe(backbone, num_classes)


# Only the head learns, so the learning rate is the one knob; a probe tolerates (and often needs) large ones.
SEARCH_SPACE: dict[str, SearchDimension] = {"train.lr": FloatRange(low=1e-4, high=1e-1, log=True)}
