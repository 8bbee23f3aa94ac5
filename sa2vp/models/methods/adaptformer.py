"""AdaptFormer (Chen et al., NeurIPS 2022, §3.2): a bottleneck adapter in parallel with every block's MLP.

    x'      = x + Attn(LN1(x))                               (frozen)
    x_next  = x' + MLP(LN2(x')) + s · W_up · ReLU(W_down · x')

The adapter reads the residual stream x' itself, not LN2(x'): the paper's equation writes LN(x'), but the
authors' release (models/custom_modules.py, `adaptmlp(x)` with ffn_adapter_layernorm_option "none", the
setting of its published runs) feeds the un-normalised x', and the published numbers come from the release.
W_down is Kaiming-uniform, W_up and both biases zero, so training starts exactly at the frozen backbone.

The adapters are attached with forward hooks on each block's `norm2` (to read x') and `mlp` (to add the
adapter's output to the MLP's), instead of replacing modules: the backbone keeps its module tree, its
parameter names and its weights digest, and the adapters are the model's own `adapters` list. This works for
any pre-norm block computing `x + mlp(norm2(x))` — timm's ViT and Swin blocks; anything else is an error.
With LayerScale (`ls2`, not in ViT-B or Swin) the adapter's output is scaled by it as the MLP's is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sa2vp.models.backbones import BackboneError
from sa2vp.models.base import AdaptedModel, BackboneClassifier
from sa2vp.models.containers import ModuleListOf
from sa2vp.settings import AdaptFormerSettings, Choice, FloatRange, ModelSettings, SearchDimension


class ParallelAdapter(nn.Module):
    """s · up(dropout(ReLU(down(x)))), d → t → d (the release's `Adapter` with add_residual=False)."""

    def __init__(self, dim: int, hidden: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)
        self._stream: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale

    def attach(self, block: nn.Module) -> None:
        """Hook this adapter beside `block.mlp`. The hooks are bound methods of the adapter, so a deep copy of
        the model hooks the copied backbone to the copied adapters."""
        block.get_submodule("norm2").register_forward_hook(self._read_stream)
        block.get_submodule("mlp").register_forward_hook(self._add_to_mlp)

    def _read_stream(self, norm: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self._stream = (args[0], output)  # (x', LN2(x')), until the MLP runs

    def _add_to_mlp(self, mlp: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        stream, self._stream = self._stream, None
        if stream is None or args[0] is not stream[1]:
            raise BackboneError(
                "model.method=adaptformer: a block's mlp did not read its norm2's output; AdaptFormer supports "
                "pre-norm blocks computing x + mlp(norm2(x)) (timm ViT and Swin blocks)"
            )
        return output + self(stream[0])


class AdaptFormer(BackboneClassifier):
    """A frozen backbone with a parallel adapter beside every block's MLP, and a linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int, settings: AdaptFormerSettings) -> None:
        super().__init__(backbone.requires_grad_(False), num_classes)
        blocks = mlp_blocks(backbone)
        self.adapters = ModuleListOf(
            ParallelAdapter(fc1.in_features, settings.dim, settings.scale, settings.dropout) for _, fc1 in blocks
        )
        for (block, _), adapter in zip(blocks, self.adapters, strict=True):
            adapter.attach(block)

    def describe(self) -> list[str]:
        first = self.adapters[0]
        return [
            f"adapter dim={first.down.out_features}  scale s={first.scale:g}  dropout={first.drop.p:g}, beside the "
            f"MLP of each of {len(self.adapters)} blocks"
        ]


def mlp_blocks(backbone: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
    """The backbone's transformer blocks (modules with `norm2` and an `mlp` whose `fc1` is nn.Linear), in order,
    each with that `fc1` (whose input width is the residual stream's)."""
    blocks = [
        (m, fc1)
        for m in backbone.modules()
        if isinstance(getattr(m, "norm2", None), nn.Module)
        and isinstance(fc1 := getattr(getattr(m, "mlp", None), "fc1", None), nn.Linear)
    ]
    if not blocks:
        raise BackboneError(
            f"model.method=adaptformer: the {type(backbone).__name__} has no transformer blocks with norm2 and "
            "mlp.fc1 to attach adapters to; AdaptFormer supports timm ViT and Swin backbones"
        )
    return blocks


def build(backbone: nn.Module, num_classes: int, settings: ModelSettings) -> AdaptedModel:
    return AdaptFormer(backbone, num_classes, settings.adaptformer)


SEARCH_SPACE: dict[str, SearchDimension] = {
    "model.adaptformer.dim": Choice(choices=[8, 16, 32, 64]),
    "model.adaptformer.scale": FloatRange(low=0.01, high=1.0, log=True),
    "train.lr": FloatRange(low=1e-4, high=2e-2, log=True),
}
