"""LoRA (Hu et al., ICLR 2022, §4.1) on a frozen timm backbone, through the peft library.

Every targeted nn.Linear W of the backbone becomes W·x + (α/r)·B·A·dropout(x), with A (r × in) Kaiming-uniform
and B (out × r) zero, so training starts exactly at the frozen backbone. The default target is timm's fused
attention input projection `attn.qkv` (ViT and Swin alike), i.e. LoRA on W_q, W_k and W_v at once.

peft wraps each targeted layer in place: the backbone's own weights are then named `….qkv.base_layer.weight`
and the factors `….qkv.lora_A.default.weight`; `backbone_name` maps them back, so the backbone's digest and
size are those of the plain backbone.
"""

from __future__ import annotations

from torch import nn

from sa2vp.models.base import AdaptedModel, BackboneClassifier
from sa2vp.settings import Choice, FloatRange, LoRASettings, ModelSettings, SearchDimension, SettingsError


class LoRA(BackboneClassifier):
    """A frozen backbone with LoRA factors injected into its `settings.targets` layers, and a linear head."""

    injected_group = "lora"

    def __init__(self, backbone: nn.Module, num_classes: int, settings: LoRASettings) -> None:
        # peft imports transformers (seconds): only when a LoRA model is built, never at module import.
        from peft import LoraConfig, inject_adapter_in_model

        backbone.requires_grad_(False)
        # Full module paths, so that a target name matching a non-Linear layer too (`proj` is also the patch
        # embedding's Conv2d) adapts only the Linear layers the setting is about.
        layers = target_layers(backbone, settings.targets)
        config = LoraConfig(
            r=settings.rank,
            # peft annotates lora_alpha as int, but only ever divides it by r: a float α is what it computes with.
            lora_alpha=settings.alpha,  # type: ignore[arg-type]
            lora_dropout=settings.dropout,
            target_modules=layers,
            bias="none",
        )
        inject_adapter_in_model(config, backbone)
        super().__init__(backbone, num_classes)
        self.lora_settings, self.adapted_layers = settings, layers
        # The dropouts live inside the backbone, which stays in eval mode unless model.backbone_dropout is on;
        # they are LoRA's own, so `train` switches them with the model.
        self._lora_dropouts = [m for name, m in backbone.named_modules() if name.endswith(".lora_dropout")]

    def train(self, mode: bool = True) -> LoRA:
        super().train(mode)
        for dropout in self._lora_dropouts:
            dropout.train(mode)
        return self

    def backbone_name(self, name: str) -> str | None:
        if ".lora_" in f".{name}":
            return None
        return name.replace(".base_layer.", ".")

    def describe(self) -> list[str]:
        s = self.lora_settings
        return [
            f"rank r={s.rank}  alpha={s.alpha:g} (updates scaled by {s.alpha / s.rank:g})  dropout={s.dropout:g}",
            f"targets {', '.join(s.targets)}: {len(self.adapted_layers)} nn.Linear layers",
        ]


def target_layers(backbone: nn.Module, targets: list[str]) -> list[str]:
    """Paths of the backbone's nn.Linear layers whose last name is one of `targets`; every target must match."""
    linear = [name for name, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    chosen = [name for name in linear if name.rsplit(".", 1)[-1] in targets]
    missing = [t for t in targets if not any(name.rsplit(".", 1)[-1] == t for name in chosen)]
    if missing:
        names = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise SettingsError(
            f"model.lora.targets: {missing[0]!r} names no nn.Linear layer of the {type(backbone).__name__}; "
            f"allowed: {', '.join(names)}"
        )
    return chosen


def build(backbone: nn.Module, num_classes: int, settings: ModelSettings) -> AdaptedModel:
    return LoRA(backbone, num_classes, settings.lora)


SEARCH_SPACE: dict[str, SearchDimension] = {
    "model.lora.rank": Choice(choices=[4, 8, 16]),
    "train.lr": FloatRange(low=1e-4, high=2e-2, log=True),
}
