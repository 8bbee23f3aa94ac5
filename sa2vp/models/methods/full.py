"""Full fine-tuning: every backbone weight and the head are trained — the upper reference of paper Tab. 1,
at 100 % of the backbone's parameters per task."""

from __future__ import annotations

from torch import nn

from sa2vp.models.base import AdaptedModel, BackboneClassifier
from sa2vp.settings import FloatRange, ModelSettings, SearchDimension


class FullFineTuning(BackboneClassifier):
    # VPT's end-to-end baseline trains the encoder in train mode: its dropout and drop-path act.
    backbone_dropout = True

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__(backbone.requires_grad_(True), num_classes)

    def describe(self) -> list[str]:
        return ["full fine-tuning: every backbone weight and the head train"]


def build(backbone: nn.Module, num_classes: int, settings: ModelSettings) -> AdaptedModel:
    return FullFineTuning(backbone, num_classes)


# Pretrained weights move little: learning rates well below the prompt methods' (VPT's full baseline: ~1e-4).
SEARCH_SPACE: dict[str, SearchDimension] = {"train.lr": FloatRange(low=1e-5, high=1e-3, log=True)}
