"""Visual prompt tuning, VPT-shallow and VPT-deep (Jia et al., ECCV 2022, §3.2), on a frozen timm ViT.

p learned prompt tokens are inserted into the token sequence after the class token (and any register tokens),
after the position embedding — prompts have no position:

    x_0 = [prefix; P_0; patches]                    prefix = CLS (+ registers), with their position embedding
    shallow:  x_{i+1} = Block_i(x_i)                    the prompt slots carry whatever the blocks make of them
    deep:     x_{i+1} = Block_i([prefix_i; P_i; patches_i])   a new set P_i replaces the slots before every layer

The prompt slots are dropped before the final norm and pooling, so the readout (the CLS token, or the average
of the patch tokens) is exactly the backbone's. Only the prompts and the head are trained.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sa2vp.models.backbones import BackboneError
from sa2vp.models.base import AdaptedModel, classifier_head
from sa2vp.settings import Choice, FloatRange, ModelSettings, SearchDimension, VPTSettings


class VisualPromptTuning(AdaptedModel):
    """VPT over a frozen timm VisionTransformer; `deep` selects VPT-deep. Forward returns logits."""

    backbone: VisionTransformer
    # VPT's code keeps the frozen encoder in train mode for its prompt transfer types.
    backbone_dropout = True

    def __init__(self, backbone: VisionTransformer, num_classes: int, settings: VPTSettings, deep: bool) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.deep = deep
        self.num_prefix = backbone.num_prefix_tokens
        self.num_prompts = settings.tokens
        dim = backbone.embed_dim
        # One set for the input, or one per layer (layer 0's set is the input set): (sets, p, d).
        sets = len(backbone.blocks) if deep else 1
        self.prompts = nn.Parameter(torch.empty(sets, settings.tokens, dim))
        # VPT's initialisation: Xavier-uniform with the patch embedding's fans, fan_in = C·P² (pixels of a
        # patch) and fan_out = d, i.e. as if each prompt were a row of the patch projection. It keeps the
        # prompts small beside the image tokens (ViT-B/16: bound 1/16), so they enter as near-neutral extra
        # keys/values and the first steps start close to the frozen features — and it is the initialisation
        # VPT's published numbers come from.
        fan_in = backbone.patch_embed.proj.weight[0].numel()
        bound = math.sqrt(6.0 / (fan_in + dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.prompt_drop = nn.Dropout(settings.dropout)
        self.head = classifier_head(backbone.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for i, block in enumerate(vit.blocks):
            if i == 0:
                x = self._insert(x, self.prompts[0])
            elif self.deep:
                x = self._insert(self._remove(x), self.prompts[i])
            x = block(x)
        x = vit.norm(self._remove(x))
        return self.head(vit.forward_head(x, pre_logits=True))

    def _insert(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """[prefix; prompts; patches] from [prefix; patches]; the prompts broadcast over the batch."""
        prompts = self.prompt_drop(prompts).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : self.num_prefix], prompts, x[:, self.num_prefix :]], dim=1)

    def _remove(self, x: torch.Tensor) -> torch.Tensor:
        """[prefix; patches] from [prefix; prompts; patches]."""
        return torch.cat([x[:, : self.num_prefix], x[:, self.num_prefix + self.num_prompts :]], dim=1)

    def extra_repr(self) -> str:
        return f"{'deep' if self.deep else 'shallow'}, tokens={self.num_prompts}"

    def describe(self) -> list[str]:
        where = f"a new set before each of {len(self.prompts)} layers" if self.deep else "at the input only"
        return [f"{'deep' if self.deep else 'shallow'}: p={self.num_prompts} prompt tokens, {where}"]


def build(backbone: nn.Module, num_classes: int, settings: ModelSettings) -> AdaptedModel:
    """`vpt-shallow` or `vpt-deep`, as settings.method says."""
    if not isinstance(backbone, VisionTransformer):
        raise BackboneError(
            f"model.method={settings.method}: vpt-* supports ViT backbones (timm VisionTransformer, vit_*), got a "
            f"{type(backbone).__name__}; use lora, adaptformer, full, linear or sa2vp on it"
        )
    return VisualPromptTuning(backbone, num_classes, settings.vpt, deep=settings.method == "vpt-deep")


# VPT tunes the prompt length per task (its Tab. 13: 1 … 200) and the learning rate.
SEARCH_SPACE: dict[str, SearchDimension] = {
    "model.vpt.tokens": Choice(choices=[1, 5, 10, 50]),
    "train.lr": FloatRange(low=1e-4, high=2e-2, log=True),
}
