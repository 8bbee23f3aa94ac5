"""SA²VP on a timm VisionTransformer — method file §2, in the order it is written there.

Two pathways run through the same frozen blocks: the *base* pathway on the image tokens and the *prompt*
pathway on a learned low-rank prompt map (plus the frozen positional embeddings). At every layer one pathway
reads the other through the spatially-aligned cross attention of `SpatialCrossBlock`:

    i in TO_PROMPT:  P ← Block_i(P) + γ·Cross_i(query=P, kv=B)      B ← Block_i(B)
    otherwise:       B ← Block_i(B) + γ·Cross_i(query=B, kv=P)      P ← Block_i(P)
    i in DEEP:       P ← P + e_k ⊙ Block_i(U_k·W_k + b_k)

Cross_i is computed from the states entering layer i, normalised by the block's norm1 — exactly what the
block's own attention projects to q, k, v. Both pathways therefore run each block once, as one batch, and
the cross attention reuses those q, k, v instead of projecting them again (§2, "Cost").

In training the backbone's own dropout acts as in the release (model.backbone_dropout): on the embeddings of
both pathways and inside every MLP, with a mask of its own for every image — the prompt map and the deep maps
are broadcast to the batch *before* they meet a dropout, as the release expands them.

What SA²VP is on any backbone (output, loss, head, pooling, cross blocks from settings) is in `sa2vp_core`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from sa2vp.models.backbones import BackboneError, token_grid
from sa2vp.models.base import classifier_head
from sa2vp.models.containers import ModuleDictOf
from sa2vp.models.cross_block import LowRankPromptMap
from sa2vp.models.sa2vp_core import LayerTokens, SA2VPModel, SA2VPOutput, Trace, is_stochastic
from sa2vp.settings import SA2VPSettings, SettingsError

# The release's layer sets for a 12-layer ViT; other depths use the same relative positions.
RELEASE_DEPTH = 12
RELEASE_TO_PROMPT = (0, 4, 8)
RELEASE_DEEP = (4, 8)


def release_layers(positions: tuple[int, ...], depth: int) -> list[int]:
    """The release's layer positions scaled from depth 12 to `depth` (identity for depth 12)."""
    return sorted({min(depth - 1, round(p * depth / RELEASE_DEPTH)) for p in positions})


def resolve_layers(settings: SA2VPSettings, depth: int) -> tuple[frozenset[int], frozenset[int]]:
    """(TO_PROMPT, DEEP) for a backbone of `depth` layers, validated."""
    to_prompt = settings.to_prompt_layers
    deep = settings.deep_layers
    if to_prompt is None:
        to_prompt = release_layers(RELEASE_TO_PROMPT, depth)
    if deep is None:
        # Layer 0 already receives the input prompt map, so a deep map there would be redundant.
        deep = [i for i in release_layers(RELEASE_DEEP, depth) if i > 0]
    for key, layers in (("model.sa2vp.to_prompt_layers", to_prompt), ("model.sa2vp.deep_layers", deep)):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise SettingsError(
                f"{key}: layer index {bad[0]} is out of range; allowed 0..{depth - 1} for a backbone of depth {depth}"
            )
    return frozenset(to_prompt), frozenset(deep)


class SA2VPViT(SA2VPModel):
    """SA²VP over a frozen timm VisionTransformer (method file §2); see `SA2VPModel` for what every version
    shares. The prompt map covers the CLS slot and the patch grid; deep maps join at the DEEP layers."""

    backbone: VisionTransformer

    def __init__(self, backbone: VisionTransformer, num_classes: int, settings: SA2VPSettings) -> None:
        _check_backbone(backbone)
        super().__init__(backbone, settings)
        depth, dim = len(self._blocks), backbone.embed_dim
        self.grid = token_grid(backbone)
        self._check_window(self.grid)
        self.num_prefix = backbone.num_prefix_tokens
        self.to_prompt, self.deep = resolve_layers(settings, depth)
        tokens = self.num_prefix + self.grid[0] * self.grid[1]

        self.prompt_map = LowRankPromptMap(tokens, settings.prompt_rank, dim)
        # Deep maps have no positional embedding in the release; each gets an SSF-style channel scale e_k.
        self.deep_maps = ModuleDictOf(
            {str(i): LowRankPromptMap(tokens, settings.prompt_rank, dim) for i in sorted(self.deep)}
        )
        self.deep_scales = nn.ParameterDict({str(i): nn.Parameter(torch.randn(dim) * 0.02) for i in sorted(self.deep)})
        heads = [_attention(block).num_heads for block in self._blocks]
        self.cross = self._cross_blocks(heads, dim=dim, grid=self.grid, num_prefix=self.num_prefix)
        self.head = classifier_head(dim, num_classes)

    def pathways(self, images: torch.Tensor) -> SA2VPOutput:
        base = self._embed_images(images)
        prompt = self._embed_prompt(base.shape[0])
        base, prompt = self._run_blocks(base, prompt)
        return SA2VPOutput(self.head(self._pooled(base)), self.head(self._pooled(prompt)))

    def base_logits(self, images: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        base = self._embed_images(images)
        base, _ = self._run_blocks(base, self._embed_prompt(base.shape[0]), trace)
        return self.head(self._pooled(base))

    @property
    def _blocks(self) -> Sequence[Block]:
        """The backbone's blocks, typed as what `_check_backbone` verified them to be (timm's Block)."""
        return cast(Sequence[Block], self.backbone.blocks)

    def _embed_images(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def _embed_prompt(self, batch: int) -> torch.Tensor:
        """P_0 = U_0·W_0 + b_0 + pos_embed for each image, through the embedding dropout as the image tokens
        are; slot 0 is the prompt pathway's own CLS (gets pos_embed[0])."""
        vit = self.backbone
        pos: torch.Tensor | None = vit.pos_embed
        assert pos is not None  # _check_backbone: a fixed absolute position embedding
        if vit.no_embed_class:  # position table covers the patches only
            pos = F.pad(pos, (0, 0, self.num_prefix, 0))
        return vit.norm_pre(vit.pos_drop((self.prompt_map() + pos).expand(batch, -1, -1)))

    def _run_blocks(
        self, base: torch.Tensor, prompt: torch.Tensor, trace: Trace | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = base.shape[0]
        for i, block in enumerate(self._blocks):
            both = torch.cat([base, prompt])
            q, k, v = _attention_inputs(block, both)
            base_out, prompt_out = _block_from_qkv(block, both, q, k, v).split(batch)
            (qb, qp), (kb, kp), (vb, vp) = q.split(batch), k.split(batch), v.split(batch)
            out_proj = partial(_project_out, _attention(block))
            if i in self.to_prompt:
                fused = self.cross[i](qp, kb, vb, prompt, out_proj)
                prompt_out = prompt_out + self.gamma * fused
            else:
                fused = self.cross[i](qb, kp, vp, base, out_proj)
                base_out = base_out + self.gamma * fused
            if i in self.deep:
                deep = _deep_block(block, self.deep_maps[str(i)](), batch)
                prompt_out = prompt_out + self.deep_scales[str(i)] * deep
            base, prompt = base_out, prompt_out
            if trace is not None:
                base, prompt = trace(i, base, prompt)
        return base, prompt

    def describe(self) -> list[str]:
        schedule = f"to_prompt={sorted(self.to_prompt)}  deep={sorted(self.deep)}"
        return [*super().describe(), f"{self.num_layers} layers: {schedule}  grid={self.grid[0]}x{self.grid[1]}"]

    # --- looking inside (sa2vp.explain) ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """The layers `layer_tokens` and `similarity_maps` index: the backbone's blocks."""
        return len(self._blocks)

    @property
    def similarity_grid(self) -> tuple[int, int]:
        """The patch grid (every layer's)."""
        return self.grid

    def _salient(self, images: torch.Tensor, tokens: list[LayerTokens]) -> torch.Tensor:
        """The patch token the CLS token attends to most in the last layer of the base pathway (attention
        averaged over heads)."""
        block = self._blocks[-1]
        entering = tokens[-2].base if len(tokens) > 1 else self._embed_images(images)
        q, k, _ = _attention_inputs(block, entering)
        scores = (q[:, :, :1] @ k.transpose(-2, -1)) * _attention(block).scale  # the CLS query's row: (B, H, 1, L)
        attention = scores.softmax(dim=-1).mean(dim=1)[:, 0, self.num_prefix :]  # over patch keys: (B, N)
        index = attention.argmax(dim=-1)
        return torch.stack([index // self.grid[1], index % self.grid[1]], dim=-1)

    def _token_grids(self, layer: LayerTokens) -> tuple[torch.Tensor, torch.Tensor]:
        return self._patch_grid(layer.base), self._patch_grid(layer.prompt)

    def _patch_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D): the patch tokens of a pathway on their grid (prefix tokens dropped)."""
        return tokens[:, self.num_prefix :].reshape(tokens.shape[0], *self.grid, tokens.shape[-1])


def _attention_inputs(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's q, k, v for input x, per head: (B, H, L, D) each."""
    attn = _attention(block)
    batch, length, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _block_from_qkv(block: Block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm's Block.forward given precomputed q, k, v, its dropouts and drop-paths included."""
    attn = _attention(block)
    batch, length, _ = x.shape
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=attn.scale)
    attended = attended.transpose(1, 2).reshape(batch, length, attn.attn_dim)
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(attended)))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _deep_block(block: Block, deep_map: torch.Tensor, batch: int) -> torch.Tensor:
    """Block_i(U_k·W_k + b_k) of a deep map (1, L, D) for each of `batch` images: (batch, L, D), or (1, L, D) to
    broadcast when the block is deterministic.

    The release expands the map to the batch before the block, so that each image draws its own dropout masks.
    Up to the block's first random draw (the MLP's dropout after its activation) every image computes the same
    numbers: they are computed once, and the map meets the batch there — the same random draws in the same
    order, with the attention, fc1 and its activation once instead of per image. (Expanded first, the release's
    two deep layers cost a sixth of a pathway's work; this way, about a third of that.)
    """
    if not is_stochastic(block):  # the same for every image: once, broadcast by the caller
        return block(deep_map)
    mlp = block.mlp
    shared = (block.norm1, block.attn, block.ls1, block.drop_path1, block.norm2)
    if type(mlp) is not Mlp or any(is_stochastic(m) for m in (*shared, mlp.fc1, mlp.act)):
        return block(deep_map.expand(batch, -1, -1))
    x = deep_map + block.drop_path1(block.ls1(block.attn(block.norm1(deep_map))))
    hidden = mlp.act(mlp.fc1(block.norm2(x))).expand(batch, -1, -1)  # per image from the first dropout on
    return x + block.drop_path2(block.ls2(mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(hidden))))))


def _attention(block: Block) -> Attention:
    """The block's attention, typed as what `_check_backbone` verified it to be (timm builds it from a layer
    type it is given, so its own annotation is only nn.Module)."""
    return cast(Attention, block.attn)


def _project_out(attn: Attention, attended: torch.Tensor) -> torch.Tensor:
    """The block's frozen output projection W_o (after its optional attention-output norm)."""
    return attn.proj(attn.norm(attended))


def _check_backbone(backbone: nn.Module) -> None:
    if not isinstance(backbone, VisionTransformer):
        raise BackboneError(f"SA²VP-ViT needs a timm VisionTransformer, got {type(backbone).__name__}")
    if not backbone.has_class_token or backbone.pos_embed is None or backbone.dynamic_img_size:
        raise BackboneError(
            "SA²VP-ViT needs a ViT with a class token and a fixed absolute position embedding "
            "(class_token=True, dynamic_img_size=False)"
        )
    for i, block in enumerate(backbone.blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not Block or not isinstance(attn, Attention) or getattr(attn, "gate", None) is not None:
            raise BackboneError(
                f"block {i} is {type(block).__name__} with {type(attn).__name__}: SA²VP-ViT supports timm's "
                "pre-norm Block with the standard (ungated) Attention"
            )
