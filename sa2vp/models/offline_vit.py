"""The offline default backbone as a named timm model: `timm.create_model("offline_vit12")`.

A ViT of the paper backbone's depth (12 layers, so SA²VP's layer schedule applies unchanged), narrow (64
channels, 4 heads, 0.6 M parameters) and on 16-px images in 2-px patches (an 8×8 token grid). Its weights are
not timm's: pipelines/backbone pretrains it on a generated task and commits backbones/offline-vit12.safetensors,
which params.yaml names as `backbone.weights`. This module is the one place its architecture and input
configuration are written; importing it (sa2vp.models.backbones does) registers the name with timm, and
`backbone.model_kwargs` / `backbone.img_size` still change any of it (`{"depth": 6}`).

The network is timm's VisionTransformer with exactly these arguments, so it is the one that
`vit_tiny_patch16_224` with `img_size=16, patch_size=2, embed_dim=64, depth=12, num_heads=4` builds (same
parameter names and shapes), and its data configuration is that model's (mean and std 0.5, bicubic, crop 0.9),
at 16 px: the committed weights were pretrained on inputs normalised so.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

NAME = "offline_vit12"
ARCHITECTURE: dict[str, Any] = {"patch_size": 2, "embed_dim": 64, "depth": 12, "num_heads": 4}

# timm reads a model's defaults from its module's `default_cfgs` when it registers it. The input size is the
# model's image size too (timm passes a fixed_input_size model its cfg's size as `img_size`); no weights to
# download (the file is given as backbone.weights), and none of a classifier (num_classes 0: headless).
default_cfgs = generate_default_cfgs(
    {
        NAME: {
            "input_size": (3, 16, 16),
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "crop_mode": "center",
            "mean": IMAGENET_INCEPTION_MEAN,
            "std": IMAGENET_INCEPTION_STD,
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        }
    }
)


@register_model
def offline_vit12(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The offline default backbone (the module's docstring); keyword arguments override its architecture."""
    # As timm builds its own ViTs: a weights file is adapted by the ViT checkpoint filter (older layouts, position
    # embeddings of another grid), and `features_only` reads the blocks' outputs.
    model: VisionTransformer = build_model_with_cfg(
        VisionTransformer,
        NAME,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": kwargs.pop("out_indices", 3), "feature_cls": "getter"},
        **{**ARCHITECTURE, **kwargs},
    )
    return model
