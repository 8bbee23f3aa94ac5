"""Models: frozen timm backbones and the adaptation methods built on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sa2vp.models.backbones import BackboneError, create_backbone
from sa2vp.models.base import AdaptedModel, LossTerms
from sa2vp.models.linear import LinearProbe
from sa2vp.models.sa2vp_swin import SA2VPSwin
from sa2vp.models.sa2vp_vit import SA2VPOutput, SA2VPViT, sa2vp_loss
from sa2vp.settings import Settings, SettingsError

__all__ = [
    "AdaptedModel",
    "LossTerms",
    "BackboneError",
    "ParameterSummary",
    "SA2VPOutput",
    "SA2VPSwin",
    "SA2VPViT",
    "build_model",
    "create_backbone",
    "parameter_summary",
    "search_space",
    "sa2vp_loss",
]


def build_model(settings: Settings, num_classes: int) -> AdaptedModel:
    """The backbone named in `settings.backbone`, wrapped by the method in `settings.model`.

    SA²VP has one design per backbone family (method file §2 ViT, §3 Swin); the family decides which.
    """
    backbone = create_backbone(settings.backbone)
    if settings.model.method == "linear":
        return LinearProbe(backbone, num_classes)
    if isinstance(backbone, VisionTransformer):
        if settings.model.cross_stages is not None:
            raise SettingsError("model.cross_stages: Swin backbones only; must be null for a VisionTransformer")
        return SA2VPViT(backbone, num_classes, settings.model)
    if isinstance(backbone, SwinTransformer):
        return SA2VPSwin(backbone, num_classes, settings.model)
    raise BackboneError(
        f"backbone.name: {settings.backbone.name!r} is a {type(backbone).__name__}; SA²VP supports timm's "
        "VisionTransformer (vit_*) and SwinTransformer (swin_*) families"
    )


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


def search_space(method: str) -> dict[str, Any]:
    """The settings tuning searches for `method` by default (each method declares its own SEARCH_SPACE)."""
    from sa2vp.models import sa2vp_vit

    from sa2vp.models import linear

    spaces = {"sa2vp": sa2vp_vit.SEARCH_SPACE, "linear": linear.SEARCH_SPACE}
    return dict(spaces.get(method, {}))
