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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from sa2vp.models.backbones import BackboneError
from sa2vp.models.base import AdaptedModel, LossTerms
from sa2vp.models.cross_block import RELEASE_NORM_EPS, LowRankPromptMap, SpatialCrossBlock, reinit_linear_layers
from sa2vp.models.sa2vp_vit import (
    LayerTokens,
    SA2VPOutput,
    SimilarityMaps,
    Trace,
    backbone_label,
    check_layers,
    check_window,
    is_stochastic,
    sa2vp_loss,
    token_rows,
    token_similarity,
    traced_layer_tokens,
)
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
            f"model.deep_layers: {settings.deep_layers} is not supported on Swin, which has no deep prompts in "
            "the release; allowed: null or []"
        )
    stages = settings.cross_stages
    if stages is None:  # a Swin with fewer than three stages gets its last one
        stages = [min(RELEASE_CROSS_STAGE, len(depths) - 1)]
    for stage in stages:
        if stage >= len(depths):
            raise SettingsError(
                f"model.cross_stages: stage index {stage} is out of range; allowed 0..{len(depths) - 1} for a "
                f"Swin with {len(depths)} stages"
            )
    to_prompt = {}
    for stage in stages:
        depth = depths[stage]
        blocks = release_blocks(depth) if settings.to_prompt_layers is None else settings.to_prompt_layers
        bad = [i for i in blocks if i >= depth]
        if bad:
            raise SettingsError(
                f"model.to_prompt_layers: block index {bad[0]} is out of range; allowed 0..{depth - 1} for "
                f"cross stage {stage} of depth {depth}"
            )
        to_prompt[stage] = frozenset(blocks)
    return to_prompt


class SA2VPSwin(AdaptedModel):
    """SA²VP over a frozen timm SwinTransformer.

    In training mode `forward` returns `SA2VPOutput(base, prompt)`; in eval mode the base logits.
    """

    backbone_dropout = True  # the release trains the whole model in train mode (drop-path up to 0.2)
    auxiliary_pathways = ("prompt",)

    def __init__(self, backbone: SwinTransformer, num_classes: int, settings: SA2VPSettings) -> None:
        super().__init__()
        _check_backbone(backbone)
        self.settings = settings
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.to_prompt = resolve_cross_blocks(settings, [len(stage.blocks) for stage in backbone.layers])
        for s in self.to_prompt:  # the cross blocks attend over their stage's whole grid (not Swin's windows)
            check_window(
                settings, tuple(backbone.layers[s].output_resolution), f"cross stage {s} of {backbone_label(backbone)}"
            )
        self.gamma = settings.gamma
        self.grid = tuple(backbone.patch_embed.grid_size)

        self.prompt_map = LowRankPromptMap(self.grid[0] * self.grid[1], settings.prompt_rank, backbone.layers[0].dim)
        self.cross = nn.ModuleDict(
            {str(s): _cross_blocks(backbone.layers[s], settings) for s in sorted(self.to_prompt)}
        )
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        reinit_linear_layers(self.prompt_map)
        reinit_linear_layers(self.cross)

    def forward(self, images: torch.Tensor) -> SA2VPOutput | torch.Tensor:
        output = self._run(images, prompt_logits=self.training)
        return output if self.training else output.base

    def pathways(self, images: torch.Tensor) -> SA2VPOutput:
        """Both pathways' logits, in either mode (in eval mode: what the prompt pathway alone predicts)."""
        return self._run(images, prompt_logits=True)

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
        for s, stage in enumerate(self.backbone.layers):
            if s in self.to_prompt:
                base, prompt = self._cross_stage(s, base, prompt, trace, traced)
                traced += len(stage.blocks)
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
        return self.backbone.patch_embed.norm(self.prompt_map()).reshape(1, *self.grid, -1)

    def _cross_stage(
        self, s: int, base: torch.Tensor, prompt: torch.Tensor, trace: Trace | None = None, first: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stage = self.backbone.layers[s]
        base, prompt = stage.downsample(base), stage.downsample(prompt)
        for i, (block, cross) in enumerate(zip(stage.blocks, self.cross[str(s)], strict=True)):
            if i in self.to_prompt[s]:
                fused = _cross_attention(block, cross, query=prompt, other=base)
                base, prompt = block(base), block(prompt) + self.gamma * fused
            else:
                fused = _cross_attention(block, cross, query=base, other=prompt)
                base, prompt = block(base) + self.gamma * fused, block(prompt)
            if trace is not None:
                base, prompt = trace(first + i, base, prompt)
        return base, prompt

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone's own final norm and average pooling, before any head."""
        return self.backbone.forward_head(self.backbone.norm(tokens), pre_logits=True)

    # --- looking inside (sa2vp.explain) ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """The layers `layer_tokens` and `similarity_maps` index: the blocks of the cross stage(s), in order."""
        return sum(len(self.backbone.layers[s].blocks) for s in self.to_prompt)

    @property
    def similarity_grid(self) -> tuple[int, int]:
        """The token grid of the (first) cross stage, in which `similarity_maps` takes its token."""
        return tuple(self.backbone.layers[min(self.to_prompt)].output_resolution)

    def base_logits(self, images: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """The logits SA²VP predicts with (the base pathway's); `trace` sees both pathways after every cross
        block (see `Trace`). In eval mode: what `forward` returns."""
        return self._run(images, prompt_logits=False, trace=trace).base

    def layer_tokens(self, images: torch.Tensor) -> list[LayerTokens]:
        """Both pathways' tokens, (B, H, W, C), after every block of the cross stage(s); the prompt's may be
        batch 1 (one prompt pathway for every image until it first reads the base)."""
        return traced_layer_tokens(self.base_logits, images)

    def salient_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2): the (row, column), in `similarity_grid`, of the token where the class activation map of the
        predicted class peaks. Swin pools by averaging, so a position's share of a logit is exactly
        head(norm(token)) at the last stage (Zhou et al.'s CAM); its peak is mapped onto the cross stage's grid."""
        return self._cam_peak(self.layer_tokens(images)[-1].base)

    def _cam_peak(self, base: torch.Tensor) -> torch.Tensor:
        """The CAM peak from the base pathway's tokens after the last cross block (the later stages run here as
        in `forward`)."""
        for stage in self.backbone.layers[max(self.to_prompt) + 1 :]:
            base = stage(base)
        features = self.backbone.norm(base)  # (B, H, W, C)
        predicted = self.head(self.backbone.forward_head(features, pre_logits=True)).argmax(dim=-1)
        cam = torch.einsum("bhwc,bc->bhw", features, self.head.weight[predicted])
        index = cam.flatten(1).argmax(dim=-1)
        peak = torch.stack([index // cam.shape[2], index % cam.shape[2]], dim=-1)
        return scale_token(peak, tuple(cam.shape[1:]), self.similarity_grid)

    def similarity_maps(
        self, images: torch.Tensor, layers: list[int], token: torch.Tensor | tuple[int, int] | None = None
    ) -> SimilarityMaps:
        """Fig. 5 at each of `layers` (blocks of the cross stage(s)): the cosine similarity between the base
        pathway's token at `token` ((row, column) in `similarity_grid`, for all images or (B, 2) one per image;
        default `salient_tokens`) and every token of the prompt pathway, after that block."""
        check_layers(layers, self.num_layers)
        tokens = self.layer_tokens(images)
        if token is None:
            chosen = self._cam_peak(tokens[-1].base)
        else:
            chosen = token_rows(token, len(images), self.similarity_grid)
        maps, positions = [], []
        for i in layers:
            base, prompt = tokens[i]
            here = scale_token(chosen, self.similarity_grid, tuple(base.shape[1:3]))
            maps.append(token_similarity(base, prompt, here))
            positions.append(here)
        return SimilarityMaps(list(layers), maps, positions)

    def compile_cross_blocks(self, mode: str | None = None) -> SA2VPSwin:
        """Compile the cross blocks with torch.compile, in place (see `SA2VPViT.compile_cross_blocks`)."""
        for blocks in self.cross.values():
            for block in blocks:
                block.compile(dynamic=False, mode=mode)
        return self

    def loss(self, output: SA2VPOutput, target: torch.Tensor) -> LossTerms:
        """λ·CE(base) + (1−λ)·CE(prompt); both pathway losses are reported."""
        total, base, prompt = sa2vp_loss(output, target, self.settings.lam)
        return LossTerms(total, {"base": base, "prompt": prompt})


def scale_token(token: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, 2) grid positions moved from a `source` grid to the cell of a `target` grid under their centres."""
    if source == target:
        return token
    size_from, size_to = torch.tensor(source), torch.tensor(target)
    return ((token + 0.5) * size_to / size_from).floor().long().minimum(size_to - 1)


def _cross_blocks(stage: nn.Module, settings: SA2VPSettings) -> nn.ModuleList:
    """One cross block (adapter d → t → d) per block of `stage`, on the stage's full token grid, no CLS."""
    return nn.ModuleList(
        SpatialCrossBlock(
            block.dim,
            settings.adapter_dim if settings.prompt_adapter else None,
            settings.adapter_act,
            settings.dropout,
            settings.window_size,
            settings.border,
            settings.head_mode,
            tuple(stage.output_resolution),
            block.attn.num_heads,
            num_prefix=0,
        )
        for block in stage.blocks
    )


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
    norm = block.norm1
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
    for s, stage in enumerate(backbone.layers):
        for i, block in enumerate(stage.blocks):
            if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
                raise BackboneError(
                    f"stage {s} block {i} is {type(block).__name__}: SA²VP-Swin supports timm's SwinTransformerBlock "
                    "with WindowAttention"
                )
