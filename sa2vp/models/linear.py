"""Linear probing: the frozen backbone's pooled feature (ViT: the CLS token after the final norm) and a
trained linear head — the baseline every adaptation method must beat (paper Tab. 1)."""

from __future__ import annotations

import torch
from torch import nn

from sa2vp.models.base import AdaptedModel


class LinearProbe(AdaptedModel):
    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # nothing below the head is trained: skip the backbone's autograd graph
            features = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        return self.head(features)


SEARCH_SPACE: dict = {}  # the release's recipe (lr, epochs) is the baseline; tune.space can add train.lr
