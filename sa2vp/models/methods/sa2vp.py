"""SA²VP itself in the method registry: one design per backbone family (method file §2 ViT, §3 Swin), both
defined beside the pieces they share (sa2vp.models.sa2vp_vit, sa2vp_swin, cross_block)."""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sa2vp.models.backbones import BackboneError
from sa2vp.models.base import AdaptedModel
from sa2vp.models.sa2vp_swin import SA2VPSwin
from sa2vp.models.sa2vp_vit import SEARCH_SPACE, SA2VPViT
from sa2vp.settings import SA2VPSettings, SettingsError

__all__ = ["SEARCH_SPACE", "build"]


def build(backbone: nn.Module, num_classes: int, settings: SA2VPSettings) -> AdaptedModel:
    if isinstance(backbone, VisionTransformer):
        if settings.cross_stages is not None:
            raise SettingsError("model.cross_stages: Swin backbones only; must be null for a VisionTransformer")
        return SA2VPViT(backbone, num_classes, settings)
    if isinstance(backbone, SwinTransformer):
        return SA2VPSwin(backbone, num_classes, settings)
    raise BackboneError(
        f"model.method=sa2vp supports timm's VisionTransformer (vit_*) and SwinTransformer (swin_*) families, "
        f"got a {type(backbone).__name__}"
    )
