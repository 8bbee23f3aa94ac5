"""Models: frozen timm backbones and the adaptation methods built on them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sa2vp.models.backbones import BackboneError, create_backbone
from sa2vp.models.base import AdaptedModel, LossTerms
from sa2vp.models.sa2vp_vit import SA2VPOutput, SA2VPViT, sa2vp_loss
from sa2vp.settings import Settings

__all__ = [
    "AdaptedModel",
    "LossTerms",
    "BackboneError",
    "ParameterSummary",
    "SA2VPOutput",
    "SA2VPViT",
    "build_model",
    "create_backbone",
    "parameter_summary",
    "sa2vp_loss",
]


def build_model(settings: Settings, num_classes: int) -> AdaptedModel:
    """The backbone named in `settings.backbone`, wrapped by the method in `settings.model`."""
    return SA2VPViT(create_backbone(settings.backbone), num_classes, settings.model)


@dataclass(frozen=True)
class ParameterSummary:
    """Trainable parameters of an adapted model, by group, against the frozen backbone's size."""

    backbone: int
    groups: dict[str, int]
    head: int

    @property
    def trainable(self) -> int:
        """Trainable parameters excluding the classification head (the figure papers compare)."""
        return sum(self.groups.values())

    @property
    def percent_of_backbone(self) -> float:
        return 100.0 * self.trainable / self.backbone


def parameter_summary(model: AdaptedModel) -> ParameterSummary:
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or name.startswith("head."):
            continue
        group = name.split(".", 1)[0]
        groups[group] = groups.get(group, 0) + param.numel()
    return ParameterSummary(
        backbone=_count(model.backbone),
        groups=groups,
        head=_count(model.head),
    )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
