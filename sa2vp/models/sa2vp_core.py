"""What SA²VP is on any backbone (method file §2–§3), shared by the ViT (`sa2vp_vit`) and Swin (`sa2vp_swin`)
versions, which keep only how the two pathways run through their backbone's blocks.

Shared here: the training output `SA2VPOutput(base, prompt)` and its loss λ·CE(base) + (1−λ)·CE(prompt) with
one linear head, the backbone's own final norm and pooling, the cross blocks built from settings, the model's
description for `sa2vp model summary`, and what `sa2vp.explain` reads (layer tokens, similarity maps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sa2vp.models.base import AdaptedModel, LossTerms
from sa2vp.models.containers import ModuleListOf
from sa2vp.models.cross_block import SpatialCrossBlock
from sa2vp.settings import SA2VPSettings, SettingsError


class SA2VPOutput(NamedTuple):
    """Training-mode output: logits of the shared head on each pathway's pooled feature."""

    base: torch.Tensor
    prompt: torch.Tensor


def sa2vp_loss(
    output: SA2VPOutput, target: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(λ·CE(base) + (1−λ)·CE(prompt), CE(base), CE(prompt))."""
    base_loss = F.cross_entropy(output.base, target)
    prompt_loss = F.cross_entropy(output.prompt, target)
    return lam * base_loss + (1.0 - lam) * prompt_loss, base_loss, prompt_loss


class LayerTokens(NamedTuple):
    """Both pathways' tokens after one layer (ViT: (B, 1+N, D); Swin's cross stage: (B, H, W, C))."""

    base: torch.Tensor
    prompt: torch.Tensor


# Called after every layer i with both pathways' tokens; what it returns goes on in their place (`sa2vp.explain`
# reads each layer's tokens with it, and routes one layer's through a tap to take gradients there).
Trace = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SimilarityMaps:
    """The paper's Fig. 5: at each layer, the cosine similarity between one image token of the base pathway and
    every patch token of the prompt pathway — where the prompt map answers an image token.

    `maps[j]` is (B, h, w) at `layers[j]`; `tokens[j]` is (B, 2), the (row, column) of the image token in that
    layer's grid. Spatially aligned prompts peak at and around the token's own position."""

    layers: list[int]
    maps: list[torch.Tensor]
    tokens: list[torch.Tensor]


class SA2VPModel(AdaptedModel):
    """SA²VP over a frozen timm backbone: a prompt pathway beside the base pathway, one shared head.

    A backbone's version checks its grids against the window (`_check_window`), builds — in this order, the
    order initialisation draws random numbers in — its prompt map(s), its cross blocks `cross`
    (`_cross_blocks`) and `head` (`classifier_head`), and implements how the two pathways run (`pathways`,
    `base_logits`), what it adds to `describe`, and what `sa2vp.explain` reads (`num_layers`,
    `similarity_grid`, `_salient`, `_token_grids`).

    In training mode `forward` returns `SA2VPOutput(base, prompt)`; in eval mode the base logits, which is what
    SA²VP predicts with.
    """

    backbone: VisionTransformer | SwinTransformer
    head: nn.Linear
    backbone_dropout = True  # the release trains its whole model in train mode (ViT: dropout; Swin: drop-path)
    auxiliary_pathways = ("prompt",)

    def __init__(self, backbone: VisionTransformer | SwinTransformer, settings: SA2VPSettings) -> None:
        super().__init__()
        self.settings = settings
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.gamma = settings.gamma

    def _check_window(self, grid: tuple[int, int], part: str | None = None) -> None:
        """Refuse a window c that is larger than a token `grid` of the backbone (`part` of it) allows.

        Centred on any token of an h×w grid, a window of 2·max(h, w)−1 already reaches every token, so a larger
        one adds nothing but positions outside the grid: the same attention under `clip`, only extra zero keys
        under `zero`. Windows between max(h, w) and that bound stay allowed: they still differ near the border.
        """
        window = self.settings.window_size
        side = max(grid)
        largest = 2 * side - 1
        if window is not None and window > largest:
            label = backbone_label(self.backbone)
            where = label if part is None else f"{part} of {label}"
            raise SettingsError(
                f"model.sa2vp.window: {window} is larger than the {grid[0]}×{grid[1]} token grid of {where}; allowed: "
                f"odd 1…{largest} (2·{side}−1, which already covers the whole grid) or 'global'"
            )

    def _cross_blocks(
        self, heads: Iterable[int], *, dim: int, grid: tuple[int, int], num_prefix: int
    ) -> ModuleListOf[SpatialCrossBlock]:
        """Cross_i for each frozen block, given the blocks' head counts `heads` in order, on a `grid` of tokens
        after `num_prefix` global ones (ViT: CLS; Swin: none); window, border, head mode and adapter from the
        settings."""
        settings = self.settings
        return ModuleListOf(
            SpatialCrossBlock(
                dim=dim,
                num_heads=num_heads,
                grid=grid,
                num_prefix=num_prefix,
                window=settings.window_size,
                border=settings.border,
                head_mode=settings.head_mode,
                adapter_dim=settings.adapter_dim if settings.prompt_adapter else None,
                activation=settings.adapter_act,
                dropout=settings.dropout,
            )
            for num_heads in heads
        )

    def forward(self, images: torch.Tensor) -> SA2VPOutput | torch.Tensor:
        return self.pathways(images) if self.training else self.base_logits(images)

    def pathways(self, images: torch.Tensor) -> SA2VPOutput:
        """Both pathways' logits, in either mode (in eval mode: what the prompt pathway alone predicts)."""
        raise NotImplementedError

    def base_logits(self, images: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """The logits SA²VP predicts with (the base pathway's), without the prompt pathway's readout; `trace`
        sees both pathways' tokens after every layer of `num_layers` (see `Trace`)."""
        raise NotImplementedError

    def loss(self, output: SA2VPOutput, target: torch.Tensor) -> LossTerms:
        """λ·CE(base) + (1−λ)·CE(prompt); both pathway losses are reported."""
        total, base, prompt = sa2vp_loss(output, target, self.settings.lam)
        return LossTerms(total, {"base": base, "prompt": prompt})

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone's own final norm and pooling (ViT: the CLS token; Swin: the average), before any head."""
        return self.backbone.forward_head(self.backbone.norm(tokens), pre_logits=True)

    def describe(self) -> list[str]:
        """The settings every SA²VP model runs with; a backbone's version adds its layer schedule and grids."""
        s = self.settings
        window = "global" if s.window_size is None else f"c={s.window_size}"
        adapter = f"t={s.adapter_dim}" if s.prompt_adapter else "off"
        return [f"window {window}  gamma={self.gamma}  lambda={s.lam}  rank r={s.prompt_rank}  adapter {adapter}"]

    # --- looking inside (sa2vp.explain) ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """The layers `layer_tokens` and `similarity_maps` index."""
        raise NotImplementedError

    @property
    def similarity_grid(self) -> tuple[int, int]:
        """The token grid in which `similarity_maps` and `salient_tokens` give a token's (row, column)."""
        raise NotImplementedError

    def layer_tokens(self, images: torch.Tensor) -> list[LayerTokens]:
        """Both pathways' tokens after every layer of `num_layers`, as the forward pass computes them."""
        return traced_layer_tokens(self.base_logits, images)

    def salient_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2): the (row, column), in `similarity_grid`, of the image token the prediction relies on most
        (the default token of `similarity_maps`; each backbone's version says how it finds it)."""
        return self._salient(images, self.layer_tokens(images))

    def similarity_maps(
        self, images: torch.Tensor, layers: list[int], token: torch.Tensor | tuple[int, int] | None = None
    ) -> SimilarityMaps:
        """Fig. 5 at each of `layers`: the cosine similarity between the base pathway's token at `token`
        ((row, column) in `similarity_grid`, for all images or (B, 2) one per image; default `salient_tokens`)
        and every patch token of the prompt pathway, after that layer (the token moved onto its grid)."""
        check_layers(layers, self.num_layers)
        tokens = self.layer_tokens(images)
        if token is None:
            chosen = self._salient(images, tokens)
        else:
            chosen = token_rows(token, len(images), self.similarity_grid)
        maps, positions = [], []
        for i in layers:
            base, prompt = self._token_grids(tokens[i])
            here = scale_token(chosen, self.similarity_grid, (base.shape[1], base.shape[2]))
            maps.append(token_similarity(base, prompt, here))
            positions.append(here)
        return SimilarityMaps(list(layers), maps, positions)

    def _salient(self, images: torch.Tensor, tokens: list[LayerTokens]) -> torch.Tensor:
        """`salient_tokens` from the layer tokens of `images` already computed."""
        raise NotImplementedError

    def _token_grids(self, layer: LayerTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's base and prompt tokens on their grid, (B, h, w, D) each (the prompt's may be batch 1)."""
        raise NotImplementedError


def backbone_label(backbone: nn.Module) -> str:
    """The timm architecture name of a backbone (for messages), or its class name."""
    config = getattr(backbone, "pretrained_cfg", None) or {}
    return str(config.get("architecture") or type(backbone).__name__)


def is_stochastic(module: nn.Module) -> bool:
    """Whether any dropout or drop-path inside `module` is active (training mode with a rate > 0)."""
    return any(
        m.training and ((isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(m, DropPath) and m.drop_prob > 0))
        for m in module.modules()
    )


def traced_layer_tokens(
    base_logits: Callable[[torch.Tensor, Trace], torch.Tensor], images: torch.Tensor
) -> list[LayerTokens]:
    """Both pathways' tokens after every layer, recorded by a trace through a model's `base_logits`."""
    tokens: list[LayerTokens] = []

    def record(i: int, base: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens.append(LayerTokens(base, prompt))
        return base, prompt

    base_logits(images, record)
    return tokens


def check_layers(layers: list[int], count: int) -> None:
    """Refuse layer indices outside 0..count-1 (ValueError naming the first bad one), or none at all."""
    if not layers:
        raise ValueError("no layer given")
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range; allowed 0..{count - 1} ({count} layers)")


def token_rows(token: torch.Tensor | tuple[int, int], batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """A (row, column) for every image, (B, 2), checked to lie in `grid` (ValueError otherwise)."""
    rows = torch.as_tensor(token, dtype=torch.long).reshape(-1, 2).expand(batch, 2)
    bad = (rows < 0) | (rows >= torch.tensor(grid))
    if bool(bad.any()):
        row, column = rows[bad.any(dim=1)][0].tolist()
        raise ValueError(
            f"token ({row}, {column}) is outside the {grid[0]}×{grid[1]} token grid; allowed rows "
            f"0..{grid[0] - 1}, columns 0..{grid[1] - 1}"
        )
    return rows


def scale_token(token: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, 2) grid positions moved from a `source` grid to the cell of a `target` grid under their centres."""
    if source == target:
        return token
    size_from, size_to = torch.tensor(source), torch.tensor(target)
    return ((token + 0.5) * size_to / size_from).floor().long().minimum(size_to - 1)


def token_similarity(base: torch.Tensor, prompt: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """(B, h, w): cos(base[b, row_b, col_b], prompt[b, y, x]) for every position (y, x), from (B, h, w, D) grids of
    the two pathways (the prompt's may be batch 1) and (B, 2) token positions."""
    chosen = base[torch.arange(base.shape[0]), token[:, 0], token[:, 1]]  # (B, D)
    return F.cosine_similarity(prompt, chosen[:, None, None, :], dim=-1)
