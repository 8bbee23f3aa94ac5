"""SA²VP itself in the method registry: one design per backbone family (method file §2 ViT, §3 Swin) over
one core (sa2vp.models.sa2vp_vit, sa2vp_swin; what they share: sa2vp_core, cross_block)."""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sa2vp.models.backbones import BackboneError
from sa2vp.models.base import AdaptedModel
from sa2vp.models.sa2vp_swin import SA2VPSwin
from sa2vp.models.sa2vp_vit import SA2VPViT
from sa2vp.settings import Choice, FloatRange, ModelSettings, SearchDimension, SettingsError


def build(backbone: nn.Module, num_classes: int, settings: ModelSettings) -> AdaptedModel:
    own = settings.sa2vp
    if isinstance(backbone, VisionTransformer):
        if own.cross_stages is not None:
            raise SettingsError("model.sa2vp.cross_stages: Swin backbones only; must be null for a VisionTransformer")
        return SA2VPViT(backbone, num_classes, own)
    if isinstance(backbone, SwinTransformer):
        return SA2VPSwin(backbone, num_classes, own)
    raise BackboneError(
        f"model.method=sa2vp supports timm's VisionTransformer (vit_*) and SwinTransformer (swin_*) families, "
        f"got a {type(backbone).__name__}"
    )


# What tuning searches by default (method file §2: "γ is tuned on the validation set"): γ on a log scale
# around the release's 0.1 and 1.5, the loss weight λ, the window c, and — as for every method — the
# learning rate (the release's 1e-3, or 5e-4, is itself a per-dataset choice).
SEARCH_SPACE: dict[str, SearchDimension] = {
    "model.sa2vp.gamma": FloatRange(low=0.01, high=2.0, log=True),
    "model.sa2vp.lam": FloatRange(low=0.5, high=1.0),
    "model.sa2vp.window": Choice(choices=[1, 3, 5, 7]),
    "train.lr": FloatRange(low=1e-4, high=2e-2, log=True),
}
