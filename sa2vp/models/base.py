"""The one small interface every adaptation method implements, so the engine needs to know none of them.

model = build_model(settings, num_classes)      # an AdaptedModel
output = model(images)                           # training mode: whatever `model.loss` takes
terms = model.loss(output, targets)              # LossTerms(total, parts): parts are logged per name
model.eval(); logits = model(images)             # eval mode: class logits, always
model.trainable_state_dict()                     # what an artifact stores: never the frozen backbone
model.describe()                                 # the method's own facts, for `sa2vp model summary`
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

# A timm model of any architecture. timm's models share no class beyond nn.Module, whose typing reports every
# attribute (num_features, forward_features, forward_head) as Tensor | Module; code that works on any of them
# reads those attributes through this alias, unchecked. Architecture-specific code uses timm's own classes.
TimmModel: TypeAlias = Any


class LossTerms(NamedTuple):
    """The loss to minimise and its named components (e.g. SA²VP's two pathway losses), for logging."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class AdaptedModel(nn.Module):
    """A frozen `backbone` plus trainable parts and a classification `head`.

    Subclasses build their trainable modules in `__init__` and implement `forward`. The defaults below suit
    methods whose forward returns logits in both modes and whose backbone stays frozen.
    """

    backbone: nn.Module
    head: nn.Module
    # Whether the backbone's own dropout and drop-path act while training. Frozen means no gradient, not no
    # dropout: each method's class default is its reference code's (model.backbone_dropout: auto), and
    # `build_model` overrides it on the instance for `on` / `off`.
    backbone_dropout: bool = False
    # Group name, in the parameter summary, of trainable tensors a method injected into the backbone (LoRA).
    injected_group: str = "injected"
    # Pathways besides the one the model predicts with, each with logits of its own (SA²VP: "prompt"). A model
    # that has any implements `pathways(images)`, returning a named tuple of logits by pathway in either mode.
    auxiliary_pathways: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> AdaptedModel:
        super().train(mode)
        self.backbone.train(mode and self.backbone_dropout)
        return self

    def backbone_name(self, name: str) -> str | None:
        """timm's name of the backbone tensor `name` (a key of `backbone.state_dict()`), or None when the method
        injected it (LoRA's factors). The backbone's digest and size are taken over its own tensors only, so
        they are the same whichever method wraps it."""
        return name

    def loss(self, output: Any, target: torch.Tensor) -> LossTerms:
        return LossTerms(F.cross_entropy(output, target), {})

    def pathways(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits by pathway, a named tuple with a field per name of `auxiliary_pathways` (see there)."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary pathways")

    def describe(self) -> list[str]:
        """What this model is beyond its parameter counts, a few short lines for `sa2vp model summary`: its
        method's settings as built (window, layers, rank, …) and the geometry they were resolved to."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name: every parameter that requires grad (the artifact's content)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by `trainable_state_dict`; names and shapes must match exactly."""
        own = dict(self.named_parameters())
        expected = {name for name, p in own.items() if p.requires_grad}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"trainable weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(
                        f"trainable weight {name}: shape {tuple(tensor.shape)} does not fit {tuple(own[name].shape)}"
                    )
                own[name].copy_(tensor)


def classifier_head(features: int, num_classes: int) -> nn.Linear:
    """The linear head every method trains: weights N(0, 0.02) truncated, zero bias (as the SA²VP release)."""
    head = nn.Linear(features, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


class BackboneClassifier(AdaptedModel):
    """The backbone's own forward up to its pooled feature (ViT: the CLS token after the final norm; Swin: the
    average pool), then a linear head. The shape of every method that leaves the token sequence alone and
    trains the backbone as a whole (full), inside it (LoRA, AdaptFormer) or not at all (linear probe)."""

    backbone: TimmModel
    head: nn.Linear

    def __init__(self, backbone: TimmModel, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = classifier_head(backbone.num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pre-logits feature, (B, num_features)."""
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class PathwayClassifier(nn.Module):
    """One pathway of a multi-pathway model as a classifier of its own (SA²VP's prompt pathway through the
    shared head): what that pathway alone would predict. For evaluation, in eval mode."""

    def __init__(self, model: AdaptedModel, pathway: str) -> None:
        super().__init__()
        if pathway not in model.auxiliary_pathways:
            raise ValueError(f"pathway {pathway!r}: this model has {', '.join(model.auxiliary_pathways) or 'none'}")
        self.model, self.pathway = model, pathway

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self.model.pathways(images), self.pathway)
