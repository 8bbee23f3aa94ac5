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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from sa2vp.models.backbones import BackboneError, token_grid
from sa2vp.models.base import AdaptedModel, LossTerms
from sa2vp.models.cross_block import LowRankPromptMap, SpatialCrossBlock
from sa2vp.settings import Choice, FloatRange, SA2VPSettings, SettingsError

# The release's layer sets for a 12-layer ViT; other depths use the same relative positions.
RELEASE_DEPTH = 12
RELEASE_TO_PROMPT = (0, 4, 8)
RELEASE_DEEP = (4, 8)


class SA2VPOutput(NamedTuple):
    """Training-mode output: logits of the shared head on each pathway's CLS feature."""

    base: torch.Tensor
    prompt: torch.Tensor


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
    for key, layers in (("model.to_prompt_layers", to_prompt), ("model.deep_layers", deep)):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise SettingsError(
                f"{key}: layer index {bad[0]} is out of range; allowed 0..{depth - 1} for a backbone of depth {depth}"
            )
    return frozenset(to_prompt), frozenset(deep)


def check_window(settings: SA2VPSettings, grid: tuple[int, int], where: str) -> None:
    """Refuse a window c that is larger than the token grid allows.

    Centred on any token of an h×w grid, a window of 2·max(h, w)−1 already reaches every token, so a larger
    one adds nothing but positions outside the grid: the same attention under `clip`, only extra zero keys
    under `zero`. Windows between max(h, w) and that bound stay allowed: they still differ near the border.
    """
    window = settings.window_size
    side = max(grid)
    largest = 2 * side - 1
    if window is not None and window > largest:
        raise SettingsError(
            f"model.window: {window} is larger than the {grid[0]}×{grid[1]} token grid of {where}; allowed: odd "
            f"1…{largest} (2·{side}−1, which already covers the whole grid) or 'global'"
        )


def backbone_label(backbone: nn.Module) -> str:
    """The timm architecture name of a backbone (for messages), or its class name."""
    config = getattr(backbone, "pretrained_cfg", None) or {}
    return str(config.get("architecture") or type(backbone).__name__)


class SA2VPViT(AdaptedModel):
    """SA²VP over a frozen timm VisionTransformer.

    In training mode `forward` returns `SA2VPOutput(base, prompt)`; in eval mode the base logits, which is
    what SA²VP predicts with.
    """

    backbone_dropout = True  # the release calls model.train() on the whole model
    auxiliary_pathways = ("prompt",)

    def __init__(self, backbone: VisionTransformer, num_classes: int, settings: SA2VPSettings) -> None:
        super().__init__()
        _check_backbone(backbone)
        self.settings = settings
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        self.grid = token_grid(backbone)
        check_window(settings, self.grid, backbone_label(backbone))
        self.num_prefix = backbone.num_prefix_tokens
        self.to_prompt, self.deep = resolve_layers(settings, depth)
        self.gamma = settings.gamma
        tokens = self.num_prefix + self.grid[0] * self.grid[1]

        self.prompt_map = LowRankPromptMap(tokens, settings.prompt_rank, dim)
        # Deep maps have no positional embedding in the release; each gets an SSF-style channel scale e_k.
        self.deep_maps = nn.ModuleDict(
            {str(i): LowRankPromptMap(tokens, settings.prompt_rank, dim) for i in sorted(self.deep)}
        )
        self.deep_scales = nn.ParameterDict({str(i): nn.Parameter(torch.randn(dim) * 0.02) for i in sorted(self.deep)})
        self.cross = nn.ModuleList(
            SpatialCrossBlock(
                dim,
                settings.adapter_dim if settings.prompt_adapter else None,
                settings.adapter_act,
                settings.dropout,
                settings.window_size,
                settings.border,
                settings.head_mode,
                self.grid,
                block.attn.num_heads,
                self.num_prefix,
            )
            for block in backbone.blocks
        )
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> SA2VPOutput | torch.Tensor:
        output = self.pathways(images)
        return output if self.training else output.base

    def pathways(self, images: torch.Tensor) -> SA2VPOutput:
        """Both pathways' logits, in either mode (in eval mode: what the prompt pathway alone predicts)."""
        base = self._embed_images(images)
        prompt = self._embed_prompt(base.shape[0])
        base, prompt = self._run_blocks(base, prompt)
        return SA2VPOutput(self.head(self._pooled(base)), self.head(self._pooled(prompt)))

    def _embed_images(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def _embed_prompt(self, batch: int) -> torch.Tensor:
        """P_0 = U_0·W_0 + b_0 + pos_embed for each image, through the embedding dropout as the image tokens
        are; slot 0 is the prompt pathway's own CLS (gets pos_embed[0])."""
        vit = self.backbone
        pos = vit.pos_embed
        if vit.no_embed_class:  # position table covers the patches only
            pos = F.pad(pos, (0, 0, self.num_prefix, 0))
        return vit.norm_pre(vit.pos_drop((self.prompt_map() + pos).expand(batch, -1, -1)))

    def _run_blocks(
        self, base: torch.Tensor, prompt: torch.Tensor, trace: Trace | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = base.shape[0]
        for i, block in enumerate(self.backbone.blocks):
            both = torch.cat([base, prompt])
            q, k, v = _attention_inputs(block, both)
            base_out, prompt_out = _block_from_qkv(block, both, q, k, v).split(batch)
            (qb, qp), (kb, kp), (vb, vp) = q.split(batch), k.split(batch), v.split(batch)
            out_proj = partial(_project_out, block.attn)
            if i in self.to_prompt:
                fused = self.cross[i](qp, kb, vb, prompt, out_proj)
                prompt_out = prompt_out + self.gamma * fused
            else:
                fused = self.cross[i](qb, kp, vp, base, out_proj)
                base_out = base_out + self.gamma * fused
            if i in self.deep:
                deep_map = self.deep_maps[str(i)]()
                if is_stochastic(block):  # a dropout mask per image, as the release expands the map first
                    deep_map = deep_map.expand(batch, -1, -1)
                # Otherwise the map is the same for every image: run it through the block once, broadcast.
                prompt_out = prompt_out + self.deep_scales[str(i)] * block(deep_map)
            base, prompt = base_out, prompt_out
            if trace is not None:
                base, prompt = trace(i, base, prompt)
        return base, prompt

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone's own final norm and pooling (CLS token for the paper's ViT), before any head."""
        return self.backbone.forward_head(self.backbone.norm(tokens), pre_logits=True)

    # --- looking inside (sa2vp.explain) ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """The layers `layer_tokens` and `similarity_maps` index: the backbone's blocks."""
        return len(self.backbone.blocks)

    def base_logits(self, images: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """The logits SA²VP predicts with (the base pathway's), without the prompt pathway's readout; `trace`
        sees both pathways' tokens after every layer (see `Trace`). In eval mode: what `forward` returns."""
        base = self._embed_images(images)
        base, _ = self._run_blocks(base, self._embed_prompt(base.shape[0]), trace)
        return self.head(self._pooled(base))

    def layer_tokens(self, images: torch.Tensor) -> list[LayerTokens]:
        """Both pathways' tokens after every layer, as the forward pass computes them."""
        return traced_layer_tokens(self.base_logits, images)

    def salient_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2): the (row, column) of the patch token the CLS token attends to most in the last layer of the
        base pathway (attention averaged over heads)."""
        return self._attention_peak(images, self.layer_tokens(images))

    def _attention_peak(self, images: torch.Tensor, tokens: list[LayerTokens]) -> torch.Tensor:
        block = self.backbone.blocks[-1]
        entering = tokens[-2].base if len(tokens) > 1 else self._embed_images(images)
        q, k, _ = _attention_inputs(block, entering)
        scores = (q[:, :, :1] @ k.transpose(-2, -1)) * block.attn.scale  # the CLS query's row: (B, H, 1, L)
        attention = scores.softmax(dim=-1).mean(dim=1)[:, 0, self.num_prefix :]  # over patch keys: (B, N)
        index = attention.argmax(dim=-1)
        return torch.stack([index // self.grid[1], index % self.grid[1]], dim=-1)

    def similarity_maps(
        self, images: torch.Tensor, layers: list[int], token: torch.Tensor | tuple[int, int] | None = None
    ) -> SimilarityMaps:
        """Fig. 5 at each of `layers`: the cosine similarity between the base pathway's patch token at `token`
        ((row, column) in the patch grid, for all images or (B, 2) one per image; default `salient_tokens`)
        and every patch token of the prompt pathway, after that layer."""
        check_layers(layers, self.num_layers)
        tokens = self.layer_tokens(images)
        chosen = self._attention_peak(images, tokens) if token is None else token_rows(token, len(images), self.grid)
        grids = [(self._patch_grid(tokens[i].base), self._patch_grid(tokens[i].prompt)) for i in layers]
        return SimilarityMaps(
            list(layers), [token_similarity(base, prompt, chosen) for base, prompt in grids], [chosen] * len(layers)
        )

    def _patch_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D): the patch tokens of a pathway on their grid (prefix tokens dropped)."""
        return tokens[:, self.num_prefix :].reshape(tokens.shape[0], *self.grid, tokens.shape[-1])

    def compile_cross_blocks(self, mode: str | None = None) -> SA2VPViT:
        """Compile the cross blocks with torch.compile, in place.

        Each cross block is some twenty small memory-bound operations (pads, tile copies, masked attention,
        projection, norm, adapter); on a GPU their launch overhead, not their arithmetic, dominates.
        Compiling fuses them. The first step pays the compilation (tens of seconds).
        """
        for block in self.cross:
            block.compile(dynamic=False, mode=mode)
        return self

    def loss(self, output: SA2VPOutput, target: torch.Tensor) -> LossTerms:
        """λ·CE(base) + (1−λ)·CE(prompt); both pathway losses are reported."""
        total, base, prompt = sa2vp_loss(output, target, self.settings.lam)
        return LossTerms(total, {"base": base, "prompt": prompt})


def sa2vp_loss(
    output: SA2VPOutput, target: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(λ·CE(base) + (1−λ)·CE(prompt), CE(base), CE(prompt))."""
    base_loss = F.cross_entropy(output.base, target)
    prompt_loss = F.cross_entropy(output.prompt, target)
    return lam * base_loss + (1.0 - lam) * prompt_loss, base_loss, prompt_loss


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


def token_similarity(base: torch.Tensor, prompt: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """(B, h, w): cos(base[b, row_b, col_b], prompt[b, y, x]) for every position (y, x), from (B, h, w, D) grids of
    the two pathways (the prompt's may be batch 1) and (B, 2) token positions."""
    chosen = base[torch.arange(base.shape[0]), token[:, 0], token[:, 1]]  # (B, D)
    return F.cosine_similarity(prompt, chosen[:, None, None, :], dim=-1)


def _attention_inputs(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's q, k, v for input x, per head: (B, H, L, D) each."""
    attn = block.attn
    batch, length, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def is_stochastic(module: nn.Module) -> bool:
    """Whether any dropout or drop-path inside `module` is active (training mode with a rate > 0)."""
    return any(
        m.training and ((isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(m, DropPath) and m.drop_prob > 0))
        for m in module.modules()
    )


def _block_from_qkv(block: Block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm's Block.forward given precomputed q, k, v, its dropouts and drop-paths included."""
    attn = block.attn
    batch, length, _ = x.shape
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=attn.scale)
    attended = attended.transpose(1, 2).reshape(batch, length, attn.attn_dim)
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(attended)))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


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


# What tuning searches by default (method file §2: "γ is tuned on the validation set"): γ on a log scale
# around the release's 0.1 and 1.5, the loss weight λ, the window c, and — as for every method — the
# learning rate (the release's 1e-3, or 5e-4, is itself a per-dataset choice).
SEARCH_SPACE = {
    "model.gamma": FloatRange(low=0.01, high=2.0, log=True),
    "model.lam": FloatRange(low=0.5, high=1.0),
    "model.window": Choice(choices=[1, 3, 5, 7]),
    "train.lr": FloatRange(low=1e-4, high=2e-2, log=True),
}
