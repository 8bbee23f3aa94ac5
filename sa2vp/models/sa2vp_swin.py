"""SA²VP on a timm SwinTransformer — method file §3, the authors' release for Swin.

One low-rank prompt map at patch-embedding resolution (through the frozen patch-embedding norm) runs through
every frozen stage beside the image tokens: the same blocks, shifted windows and patch merging. Only the
blocks of the cross stage(s) (release: the third stage, index 2) exchange information, with the cross block
of the ViT version on the full stage grid:

    i in TO_PROMPT:  P ← Block_i(P) + γ·Cross_i(query=P, kv=B)      B ← Block_i(B)
    otherwise:       B ← Block_i(B) + γ·Cross_i(query=B, kv=P)      P ← Block_i(P)

Cross_i uses the block's own qkv and proj, no relative-position bias and no CLS token; it normalises with
norm1's parameters at the release's ε = 1e-6 (the release loads a separate LayerNorm(ε=1e-6) from norm1,
whose own ε is timm's 1e-5). As released, the prompt projection and the adapters are re-initialised like
every Linear of the release's Swin (truncated N(0, 0.02), zero bias), and the backbone trains with its
drop-path (rising to 0.2) active, a mask per image: the prompt map is then broadcast to the batch from the
start, as the release does. Unlike the ViT
version it projects q, k, v again instead of reusing the block's: the block computes them inside timm's
shifted, padded window partition, and reusing them would mean re-implementing that attention (shift masks,
bias-valued padding tokens, relative-position bias). The price is 3·d² per token of the cross stage, about a
tenth of a Swin-B training step's FLOPs.

What SA²VP is on any backbone (output, loss, head, pooling, cross blocks from settings) is in `sa2vp_core`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage, WindowAttention
from torch import nn

from sa2vp.models.backbones import BackboneError, token_grid
from sa2vp.models.base import classifier_head
from sa2vp.models.containers import ModuleDictOf, ModuleListOf
from sa2vp.models.cross_block import RELEASE_NORM_EPS, LowRankPromptMap, SpatialCrossBlock, reinit_linear_layers
from sa2vp.models.sa2vp_core import LayerTokens, SA2VPModel, SA2VPOutput, Trace, is_stochastic, scale_token
from sa2vp.settings import SA2VPSettings, SettingsError

# The release: cross attention in the third stage of Swin-B (18 blocks); the prompt queries at 0, 6 and 12.
RELEASE_CROSS_STAGE = 2
RELEASE_STAGE_DEPTH = 18
RELEASE_TO_PROMPT = (0, 6, 12)


def release_blocks(depth: int) -> list[int]:
    """The release's TO_PROMPT blocks scaled from 18 blocks to `depth` (identity for 18).

    The last block always lets the base query the prompt, as in the release: in a stage of one or two
    blocks the scaled positions would otherwise cover every block, and the base logits, which SA²VP predicts
    with, would never see the prompt.
    """
    return sorted({i for p in RELEASE_TO_PROMPT if (i := round(p * depth / RELEASE_STAGE_DEPTH)) < depth - 1})


def resolve_cross_blocks(settings: SA2VPSettings, depths: list[int]) -> dict[int, frozenset[int]]:
    """{cross stage: its TO_PROMPT block indices} for a Swin with stage depths `depths`, validated."""
    if settings.deep_layers:
        raise SettingsError(
            f"model.sa2vp.deep_layers: {settings.deep_layers} is not supported on Swin, which has no deep prompts in "
            "the release; allowed: null or []"
        )
    stages = settings.cross_stages
    if stages is None:  # a Swin with fewer than three stages gets its last one
        stages = [min(RELEASE_CROSS_STAGE, len(depths) - 1)]
    for stage in stages:
        if stage >= len(depths):
            raise SettingsError(
                f"model.sa2vp.cross_stages: stage index {stage} is out of range; allowed 0..{len(depths) - 1} for a "
                f"Swin with {len(depths)} stages"
            )
    to_prompt = {}
    for stage in stages:
        depth = depths[stage]
        blocks = release_blocks(depth) if settings.to_prompt_layers is None else settings.to_prompt_layers
        bad = [i for i in blocks if i >= depth]
        if bad:
            raise SettingsError(
                f"model.sa2vp.to_prompt_layers: block index {bad[0]} is out of range; allowed 0..{depth - 1} for "
                f"cross stage {stage} of depth {depth}"
            )
        to_prompt[stage] = frozenset(blocks)
    return to_prompt


class SA2VPSwin(SA2VPModel):
    """SA²VP over a frozen timm SwinTransformer (method file §3); see `SA2VPModel` for what every version
    shares. `to_prompt` maps each cross stage to its TO_PROMPT blocks; `cross[str(stage)]` holds its blocks."""

    backbone: SwinTransformer

    def __init__(self, backbone: SwinTransformer, num_classes: int, settings: SA2VPSettings) -> None:
        _check_backbone(backbone)
        super().__init__(backbone, settings)
        stages = _stages(backbone)
        self.to_prompt = resolve_cross_blocks(settings, [len(_blocks(stage)) for stage in stages])
        for s in self.to_prompt:  # the cross blocks attend over their stage's whole grid (not Swin's windows)
            self._check_window(stage_grid(stages[s]), f"cross stage {s}")
        self.grid = token_grid(backbone)  # the prompt map's: patch-embedding resolution

        self.prompt_map = LowRankPromptMap(self.grid[0] * self.grid[1], settings.prompt_rank, stages[0].dim)
        self.cross = ModuleDictOf({str(s): self._stage_cross_blocks(stages[s]) for s in sorted(self.to_prompt)})
        self.head = classifier_head(backbone.num_features, num_classes)
        reinit_linear_layers(self.prompt_map)
        reinit_linear_layers(self.cross)

    def _stage_cross_blocks(self, stage: SwinTransformerStage) -> ModuleListOf[SpatialCrossBlock]:
        """One cross block (adapter d → t → d) per block of `stage`, on the stage's full token grid, no CLS."""
        blocks = _blocks(stage)
        heads = [block.attn.num_heads for block in blocks]
        return self._cross_blocks(heads, dim=blocks[0].dim, grid=stage_grid(stage), num_prefix=0)

    def pathways(self, images: torch.Tensor) -> SA2VPOutput:
        return self._run(images, prompt_logits=True)

    def base_logits(self, images: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """`SA2VPModel.base_logits`; `trace` sees both pathways after every block of the cross stage(s)."""
        return self._run(images, prompt_logits=False, trace=trace).base

    def _run(self, images: torch.Tensor, prompt_logits: bool, trace: Trace | None = None) -> SA2VPOutput:
        """Both pathways; without `prompt_logits` the prompt pathway stops after the last cross stage (what it
        does afterwards never reaches the base logits), and its logits are those of the base. `trace` sees both
        pathways after every block of the cross stages (numbered on through them, in order)."""
        base = self.backbone.patch_embed(images)  # (B, H, W, C), after the patch-embedding norm
        prompt = self._embed_prompt()
        if is_stochastic(self.backbone):  # drop-path draws per image: every image needs its own prompt pathway
            prompt = prompt.expand(base.shape[0], -1, -1, -1)
        # Otherwise the prompt pathway is the same for every image until it first reads the base: batch 1.
        last_cross = max(self.to_prompt)
        traced = 0  # blocks of the cross stages before this one
        for s, stage in enumerate(_stages(self.backbone)):
            if s in self.to_prompt:
                base, prompt = self._cross_stage(s, base, prompt, trace, traced)
                traced += len(_blocks(stage))
            elif prompt_logits or s < last_cross:
                base, prompt = stage(base), stage(prompt)
            else:
                base = stage(base)
        base_logits = self.head(self._pooled(base))
        if not prompt_logits:
            return SA2VPOutput(base_logits, base_logits)
        # A prompt that never read the base is still one for the whole batch.
        return SA2VPOutput(base_logits, self.head(self._pooled(prompt)).expand_as(base_logits))

    def _embed_prompt(self) -> torch.Tensor:
        """P_0 = LN_pe(U·W + b) on the patch grid, (1, H, W, C); timm's Swin has no absolute position embedding."""
        norm = self.backbone.patch_embed.get_submodule("norm")
        return norm(self.prompt_map()).reshape(1, *self.grid, -1)

    def _cross_stage(
        self, s: int, base: torch.Tensor, prompt: torch.Tensor, trace: Trace | None = None, first: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stage = _stages(self.backbone)[s]
        base, prompt = stage.downsample(base), stage.downsample(prompt)
        for i, (block, cross) in enumerate(zip(_blocks(stage), self.cross[str(s)], strict=True)):
            if i in self.to_prompt[s]:
                fused = _cross_attention(block, cross, query=prompt, other=base)
                base, prompt = block(base), block(prompt) + self.gamma * fused
            else:
                fused = _cross_attention(block, cross, query=base, other=prompt)
                base, prompt = block(base) + self.gamma * fused, block(prompt)
            if trace is not None:
                base, prompt = trace(first + i, base, prompt)
        return base, prompt

    def describe(self) -> list[str]:
        stages = _stages(self.backbone)
        lines = [f"prompt map {self.grid[0]}x{self.grid[1]} through all {len(stages)} stages"]
        for s, blocks in sorted(self.to_prompt.items()):
            rows, columns = stage_grid(stages[s])
            lines.append(
                f"cross stage {s} ({len(self.cross[str(s)])} blocks): to_prompt={sorted(blocks)}  grid={rows}x{columns}"
            )
        return [*super().describe(), *lines]

    # --- looking inside (sa2vp.explain) ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """The layers `layer_tokens` and `similarity_maps` index: the blocks of the cross stage(s), in order."""
        return sum(len(_blocks(_stages(self.backbone)[s])) for s in self.to_prompt)

    @property
    def similarity_grid(self) -> tuple[int, int]:
        """The token grid of the (first) cross stage, in which `similarity_maps` takes its token."""
        return stage_grid(_stages(self.backbone)[min(self.to_prompt)])

    def _salient(self, images: torch.Tensor, tokens: list[LayerTokens]) -> torch.Tensor:
        """The token where the class activation map of the predicted class peaks. Swin pools by averaging, so
        a position's share of a logit is exactly head(norm(token)) at the last stage (Zhou et al.'s CAM); its
        peak is mapped onto the cross stage's grid. The later stages run here on the base pathway's tokens
        after the last cross block, as in `forward`."""
        base = tokens[-1].base
        for stage in _stages(self.backbone)[max(self.to_prompt) + 1 :]:
            base = stage(base)
        features = self.backbone.norm(base)  # (B, H, W, C)
        predicted = self.head(self.backbone.forward_head(features, pre_logits=True)).argmax(dim=-1)
        cam = torch.einsum("bhwc,bc->bhw", features, self.head.weight[predicted])
        index = cam.flatten(1).argmax(dim=-1)
        peak = torch.stack([index // cam.shape[2], index % cam.shape[2]], dim=-1)
        return scale_token(peak, (cam.shape[1], cam.shape[2]), self.similarity_grid)

    def _token_grids(self, layer: LayerTokens) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.base, layer.prompt  # already (B, H, W, C)


def _stages(swin: SwinTransformer) -> Sequence[SwinTransformerStage]:
    """The Swin's stages, typed (timm keeps them in an nn.Sequential, whose items are typed nn.Module)."""
    return cast(Sequence[SwinTransformerStage], swin.layers)


def _blocks(stage: SwinTransformerStage) -> Sequence[SwinTransformerBlock]:
    """A stage's blocks, typed as what `_check_backbone` verified them to be."""
    return cast(Sequence[SwinTransformerBlock], stage.blocks)


def stage_grid(stage: SwinTransformerStage) -> tuple[int, int]:
    """(rows, columns) of a Swin stage's tokens, after its patch merging."""
    rows, columns = stage.output_resolution
    return rows, columns


def _cross_attention(
    block: SwinTransformerBlock, cross: SpatialCrossBlock, query: torch.Tensor, other: torch.Tensor
) -> torch.Tensor:
    """Cross_i(query, kv=other) over the whole stage grid, (B, H, W, C) in and out.

    Either pathway may still be batch 1 (the prompt before it first reads the base); it is broadcast.
    """
    batch, (height, width, dim) = max(query.shape[0], other.shape[0]), query.shape[1:]
    (q,) = _project(block, query, "q")
    k, v = _project(block, other, "kv")
    q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
    fused = cross(q, k, v, query.reshape(query.shape[0], height * width, dim), block.attn.proj)
    return fused.reshape(batch, height, width, dim)


def _project(block: SwinTransformerBlock, x: torch.Tensor, part: str) -> torch.Tensor:
    """The `q` or `kv` rows of the block's frozen qkv projection of norm1(x), per head: (n, B, heads, L, D)."""
    attn = block.attn
    width = attn.qkv.out_features // 3
    rows = slice(0, width) if part == "q" else slice(width, 3 * width)
    bias = None if attn.qkv.bias is None else attn.qkv.bias[rows]
    norm = cast(nn.LayerNorm, block.norm1)  # verified by _check_backbone
    tokens = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, eps=RELEASE_NORM_EPS).flatten(1, 2)
    out = F.linear(tokens, attn.qkv.weight[rows], bias)
    batch, length = tokens.shape[:2]
    # Same channel layout as WindowAttention: (q|k|v) × heads × head_dim.
    return out.reshape(batch, length, -1, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)


def _check_backbone(backbone: nn.Module) -> None:
    if not isinstance(backbone, SwinTransformer):
        raise BackboneError(f"SA²VP-Swin needs a timm SwinTransformer, got {type(backbone).__name__}")
    if backbone.dynamic_img_size:
        raise BackboneError("SA²VP-Swin needs a fixed input size (strict_img_size=True): the prompt map has one")
    for s, stage in enumerate(_stages(backbone)):
        for i, block in enumerate(stage.blocks):
            if (
                type(block) is not SwinTransformerBlock
                or type(block.attn) is not WindowAttention
                or not isinstance(block.norm1, nn.LayerNorm)  # the cross attention re-normalises with its weights
            ):
                raise BackboneError(
                    f"stage {s} block {i} is {type(block).__name__}: SA²VP-Swin supports timm's SwinTransformerBlock "
                    "with WindowAttention and LayerNorm"
                )
