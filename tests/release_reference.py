"""The SA²VP release's ViT model, restated literally for the tests (method file §2, "The frozen backbone in
training"): its own module tree — separate q/k/v projections, a cross block that re-projects with copies of
the frozen weights and loops over window lists, the adapter with its two dropouts, the embeddings that expand
the prompt map to the batch before their dropout, deep maps expanded before the frozen block — and its
statement order. Nothing here shares code with `sa2vp.models`: `from_sa2vp` copies a library model's weights
into it, and `trainable_pairs` names which of its tensors correspond to the library's trainable ones.

Slow and obviously structured like the release; for tiny ViTs only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from sa2vp.models.sa2vp_vit import SA2VPViT


def frozen_block(vit: VisionTransformer, i: int) -> tuple[Block, Attention, nn.Linear, nn.Linear]:
    """Block i of a timm ViT with its attention and its MLP's two layers, checked to be timm's standard ones
    (the only kind SA²VP-ViT accepts)."""
    block = vit.blocks[i]
    assert isinstance(block, Block) and isinstance(block.attn, Attention) and isinstance(block.mlp, Mlp)
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
    return block, block.attn, fc1, fc2


class ReleaseAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value/out layers and two dropouts (attention
    probabilities, output), both at the config's attention dropout rate."""

    def __init__(self, dim: int, heads: int, attention_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.attn_dropout = nn.Dropout(attention_dropout)
        self.proj_dropout = nn.Dropout(attention_dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        probs = self.attn_dropout(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
        context = (probs @ v).transpose(1, 2).reshape(x.shape)
        return self.proj_dropout(self.out(context))


class ReleaseMlp(nn.Module):
    """fc1 → GELU → dropout → fc2 → dropout, one dropout module used twice (the release's Mlp and Mlp_small)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class ReleaseBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReleaseAttention(dim, heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ReleaseMlp(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class ReleaseCrossAttention(nn.Module):
    """The query pathway's CLS reads every token of the other pathway; each patch query reads the patch tokens
    of its window, listed one by one, clipped at the grid's border. Output projection, then dropout."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], window: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.grid, self.window = heads, grid, window
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.to_drop = nn.Dropout(dropout)

    def window_tokens(self, patch: int) -> list[int]:
        rows, cols = self.grid
        y, x = divmod(patch, cols)
        radius = self.window // 2
        return [
            1 + yy * cols + xx
            for yy in range(y - radius, y + radius + 1)
            for xx in range(x - radius, x + radius + 1)
            if 0 <= yy < rows and 0 <= xx < cols
        ]

    def forward(self, kv: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(q_in)), split(self.to_k(kv)), split(self.to_v(kv))
        scale = q.shape[-1] ** -0.5
        outputs = [torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * scale, -1) @ v]
        for patch in range(self.grid[0] * self.grid[1]):
            keys = self.window_tokens(patch)
            scores = q[:, :, 1 + patch : 2 + patch] @ k[:, :, keys].transpose(-1, -2) * scale
            outputs.append(torch.softmax(scores, -1) @ v[:, :, keys])
        out = torch.cat(outputs, dim=2).transpose(1, 2).reshape(q_in.shape)
        return self.to_drop(self.to_out(out))


class ReleaseCrossBlock(nn.Module):
    def __init__(
        self, dim: int, heads: int, grid: tuple[int, int], window: int, adapter_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReleaseCrossAttention(dim, heads, grid, window, dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ReleaseMlp(dim, adapter_dim, dropout)

    def forward(self, kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        h = q
        x = self.attn(self.attention_norm(kv), self.attention_norm(q)) + h
        return self.ffn(self.ffn_norm(x))


class ReleaseSA2VP(nn.Module):
    """The release's ViT SA²VP for a patch-conv ViT with a class token; layer sets taken from the library
    model it is copied from. `forward` returns (base logits, prompt logits) from the shared head."""

    def __init__(self, model: SA2VPViT, dropout: float, attention_dropout: float = 0.0) -> None:
        super().__init__()
        vit = model.backbone
        dim, grid = vit.embed_dim, model.grid
        _, attention, fc1, _ = frozen_block(vit, 0)
        heads, mlp_dim = attention.num_heads, fc1.out_features
        patch = vit.patch_embed.proj
        self.patch_embeddings = nn.Conv2d(patch.in_channels, dim, patch.kernel_size, patch.stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        assert vit.pos_embed is not None
        self.position_embeddings = nn.Parameter(torch.zeros_like(vit.pos_embed))
        self.dropout = nn.Dropout(dropout)
        self.ppt = nn.Parameter(torch.zeros_like(model.prompt_map.tokens))
        self.ppt_proj = nn.Linear(model.prompt_map.proj.in_features, dim)
        self.layer = nn.ModuleList(ReleaseBlock(dim, heads, mlp_dim, dropout, attention_dropout) for _ in vit.blocks)
        self.cross_attn = nn.ModuleList(
            ReleaseCrossBlock(dim, heads, grid, *_window_and_adapter_dim(model, i), model.settings.dropout)
            for i in range(len(vit.blocks))
        )
        self.prompt_list = sorted(model.deep)
        self.b2p_list = sorted(model.to_prompt)
        self.deep_ppt = nn.ParameterList(
            nn.Parameter(torch.zeros_like(model.deep_maps[str(i)].tokens)) for i in self.prompt_list
        )
        self.deep_proj = nn.ModuleList(nn.Linear(model.prompt_map.proj.in_features, dim) for _ in self.prompt_list)
        self.cross_conv = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in self.prompt_list)
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, model.head.out_features)
        self.add_scale = model.gamma

    def block(self, i: int) -> ReleaseBlock:
        layer = self.layer[i]
        assert isinstance(layer, ReleaseBlock)
        return layer

    def cross_block(self, i: int) -> ReleaseCrossBlock:
        cross = self.cross_attn[i]
        assert isinstance(cross, ReleaseCrossBlock)
        return cross

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images.shape[0]
        x = self.patch_embeddings(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        hidden = self.dropout(x + self.position_embeddings)
        prompt = self.dropout(self.ppt_proj(self.ppt).expand(batch, -1, -1) + self.position_embeddings)
        for i, layer in enumerate(self.layer):
            if i not in self.b2p_list:
                fusion = self.cross_attn[i](prompt, hidden)
                prompt = layer(prompt)
                hidden = layer(hidden)
                hidden = hidden + fusion * self.add_scale
            else:
                fusion = self.cross_attn[i](hidden, prompt)
                prompt = layer(prompt)
                if i in self.prompt_list:
                    k = self.prompt_list.index(i)
                    inner = layer(self.deep_proj[k](self.deep_ppt[k]).expand(batch, -1, -1))
                    prompt = prompt + inner * self.cross_conv[k]
                hidden = layer(hidden)
                prompt = prompt + fusion * self.add_scale
        return self.head(self.encoder_norm(hidden)[:, 0]), self.head(self.encoder_norm(prompt)[:, 0])


def _window_and_adapter_dim(model: SA2VPViT, i: int) -> tuple[int, int]:
    """The library's window c and adapter width t at layer i (the release has no global window, no ablation)."""
    cross = model.cross[i]
    assert cross.window is not None and cross.adapter is not None
    return cross.window, cross.adapter.down.out_features


def trainable_pairs(model: SA2VPViT) -> dict[str, str]:
    """Library trainable parameter name → the release model's name for the same tensor."""
    pairs = {
        "prompt_map.tokens": "ppt",
        "prompt_map.proj.weight": "ppt_proj.weight",
        "prompt_map.proj.bias": "ppt_proj.bias",
        "head.weight": "head.weight",
        "head.bias": "head.bias",
    }
    for k, i in enumerate(sorted(model.deep)):
        pairs |= {
            f"deep_maps.{i}.tokens": f"deep_ppt.{k}",
            f"deep_maps.{i}.proj.weight": f"deep_proj.{k}.weight",
            f"deep_maps.{i}.proj.bias": f"deep_proj.{k}.bias",
            f"deep_scales.{i}": f"cross_conv.{k}",
        }
    for i in range(len(model.cross)):
        for ours, theirs in (("norm", "ffn_norm"), ("down", "ffn.fc1"), ("up", "ffn.fc2")):
            for kind in ("weight", "bias"):
                pairs[f"cross.{i}.adapter.{ours}.{kind}"] = f"cross_attn.{i}.{theirs}.{kind}"
    return pairs


@torch.no_grad()
def from_sa2vp(model: SA2VPViT, dropout: float, attention_dropout: float = 0.0) -> ReleaseSA2VP:
    """The release model holding `model`'s frozen backbone and trained tensors (copies)."""
    release = ReleaseSA2VP(model, dropout, attention_dropout)
    vit = model.backbone
    dim = vit.embed_dim
    release.patch_embeddings.load_state_dict(vit.patch_embed.proj.state_dict())
    assert vit.cls_token is not None and vit.pos_embed is not None
    release.cls_token.copy_(vit.cls_token)
    release.position_embeddings.copy_(vit.pos_embed)
    release.encoder_norm.load_state_dict(vit.norm.state_dict())
    for i in range(len(vit.blocks)):
        block, frozen, fc1, fc2 = frozen_block(vit, i)
        assert frozen.qkv.bias is not None
        weights, biases = frozen.qkv.weight.split(dim), frozen.qkv.bias.split(dim)
        layer_block, cross_block = release.block(i), release.cross_block(i)
        attn, cross_attn = layer_block.attn, cross_block.attn
        for pair, w, b in zip(
            ((attn.query, cross_attn.to_q), (attn.key, cross_attn.to_k), (attn.value, cross_attn.to_v)),
            weights,
            biases,
            strict=True,
        ):
            for linear in pair:
                linear.weight.copy_(w)
                linear.bias.copy_(b)
        for linear in (attn.out, cross_attn.to_out):
            linear.load_state_dict(frozen.proj.state_dict())
        for norm in (layer_block.attention_norm, cross_block.attention_norm):
            norm.load_state_dict(block.norm1.state_dict())
        layer_block.ffn_norm.load_state_dict(block.norm2.state_dict())
        layer_block.ffn.fc1.load_state_dict(fc1.state_dict())
        layer_block.ffn.fc2.load_state_dict(fc2.state_dict())
    own = dict(model.named_parameters())
    theirs = dict(release.named_parameters())
    for ours, name in trainable_pairs(model).items():
        theirs[name].copy_(own[ours])
    return release
