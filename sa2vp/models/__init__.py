"""Models: frozen timm backbones and the adaptation methods built on them."""

from __future__ import annotations

from dataclasses import dataclass

from sa2vp.models.backbones import BackboneError, create_backbone
from sa2vp.models.base import AdaptedModel, LossTerms, PathwayClassifier
from sa2vp.models.methods import METHODS, Method
from sa2vp.models.sa2vp_core import SA2VPModel, SA2VPOutput, sa2vp_loss
from sa2vp.models.sa2vp_swin import SA2VPSwin
from sa2vp.models.sa2vp_vit import SA2VPViT
from sa2vp.settings import SearchDimension, Settings, SettingsError

__all__ = [
    "METHODS",
    "AdaptedModel",
    "BackboneError",
    "LossTerms",
    "ParameterSummary",
    "PathwayClassifier",
    "SA2VPModel",
    "SA2VPOutput",
    "SA2VPSwin",
    "SA2VPViT",
    "build_model",
    "create_backbone",
    "parameter_summary",
    "sa2vp_loss",
    "search_space",
]


def build_model(settings: Settings, num_classes: int) -> AdaptedModel:
    """The backbone named in `settings.backbone`, wrapped by the method `settings.model.method` (METHODS)."""
    method = _method(settings.model.method)
    backbone = create_backbone(settings.backbone)
    try:
        model = method.build(backbone, num_classes, settings.model)
    except BackboneError as exc:  # the method knows the module, not the name it was built from
        raise BackboneError(f"backbone.name={settings.backbone.name!r}: {exc}") from None
    if settings.model.backbone_dropout != "auto":  # auto: the method's class default (its reference code)
        model.backbone_dropout = settings.model.backbone_dropout == "on"
    return model.train(model.training)


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
    """Trainable parameters by top-level module (head apart) against the backbone's own size.

    What a method injected into the backbone (LoRA) is neither backbone size nor "backbone" group: it is
    counted under `model.injected_group`. Full fine-tuning trains the backbone itself: group "backbone", 100 %.
    """
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or name.startswith("head."):
            continue
        group = name.split(".", 1)[0]
        if group == "backbone" and model.backbone_name(name.removeprefix("backbone.")) is None:
            group = model.injected_group
        groups[group] = groups.get(group, 0) + param.numel()
    own = sum(p.numel() for name, p in model.backbone.named_parameters() if model.backbone_name(name) is not None)
    return ParameterSummary(backbone=own, groups=groups, head=sum(p.numel() for p in model.head.parameters()))


def search_space(method: str) -> dict[str, SearchDimension]:
    """The settings tuning searches for `method` by default (each method module declares its SEARCH_SPACE)."""
    return dict(_method(method).SEARCH_SPACE)


def _method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SettingsError(f"model.method: unknown method {name!r}; allowed: {', '.join(METHODS)}") from None
