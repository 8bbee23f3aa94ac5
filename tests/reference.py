"""Deliberately naive reference implementations, written straight from the method file, for the tests.

They loop over every query token and build its key set by hand, so they are slow and obviously right; the
library's fast paths are checked against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_cross_attention(q, k, v, grid, window, num_prefix=1, border="clip", head_mode="multi"):
    """Same contract as `sa2vp.models.local_attention.spatial_cross_attention`."""
    batch, heads, length, head_dim = q.shape
    if head_mode == "single":
        q, k, v = (t.transpose(1, 2).reshape(batch, 1, length, heads * head_dim) for t in (q, k, v))
    n_heads, dim = q.shape[1], q.shape[3]
    scale = dim**-0.5
    rows = []
    for b in range(batch):
        per_head = []
        for h in range(n_heads):
            outputs = []
            for i in range(length):
                keys, values = _key_set(k[b, h], v[b, h], i, grid, window, num_prefix, border)
                weights = torch.softmax(keys @ q[b, h, i] * scale, dim=0)
                outputs.append(weights @ values)
            per_head.append(torch.stack(outputs))
        rows.append(torch.stack(per_head))
    out = torch.stack(rows)  # (B, heads', L, dim)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _key_set(k, v, index, grid, window, num_prefix, border):
    """Keys/values a query at token `index` may see: all tokens, or its c×c window of patch tokens."""
    if window is None or index < num_prefix:
        return k, v
    height, width = grid
    y, x = divmod(index - num_prefix, width)
    radius = window // 2
    keys, values = [], []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            yy, xx = y + dy, x + dx
            if 0 <= yy < height and 0 <= xx < width:
                j = num_prefix + yy * width + xx
                keys.append(k[j])
                values.append(v[j])
            elif border == "zero":  # zero-padded key: scores 0, takes softmax mass, contributes nothing
                keys.append(torch.zeros_like(k[0]))
                values.append(torch.zeros_like(v[0]))
    return torch.stack(keys), torch.stack(values)


def naive_sa2vp_forward(model, images):
    """SA²VP's forward written as the pseudocode of method file §2, with the naive cross attention.

    Unlike the library it projects q, k, v again for the cross attention, runs the pathways separately
    and follows the statement order of §2 literally. Returns (base logits, prompt logits).
    """
    vit = model.backbone
    base = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    prompt = vit.norm_pre(model.prompt_map() + vit.pos_embed).expand(images.shape[0], -1, -1)
    for i, block in enumerate(vit.blocks):
        to_prompt = i in model.to_prompt  # the prompt queries the base; otherwise the base queries the prompt
        query, other = (prompt, base) if to_prompt else (base, prompt)
        fused = _naive_cross(model, i, block, query=query, other=other)
        prompt = block(prompt)
        if i in model.deep:
            prompt = prompt + model.deep_scales[str(i)] * block(model.deep_maps[str(i)]())
        base = block(base)
        if to_prompt:
            prompt = prompt + model.gamma * fused
        else:
            base = base + model.gamma * fused
    pooled = [vit.forward_head(vit.norm(x), pre_logits=True) for x in (base, prompt)]
    return model.head(pooled[0]), model.head(pooled[1])


def _naive_cross(model, i, block, query, other):
    attn = block.attn
    cross = model.cross[i]

    def heads(x, which):
        qkv = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias)
        part = qkv.chunk(3, dim=-1)[which]
        return part.reshape(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

    q, k, v = heads(query, 0), heads(other, 1), heads(other, 2)
    attended = naive_cross_attention(q, k, v, cross.grid, cross.window, cross.num_prefix, cross.border, cross.head_mode)
    return cross.adapter(attn.proj(attended) + query)


def naive_sa2vp_swin_forward(model, images):
    """SA²VP-Swin's forward written as method file §3: the §2 pseudocode inside the cross stages only.

    Both pathways run every stage (patch merging, then blocks) separately, the prompt map broadcast to the
    batch from the start; the cross attention projects q, k, v with the block's full qkv and uses the naive
    attention on the stage grid with no prefix token. Returns (base logits, prompt logits).
    """
    swin = model.backbone
    height, width = swin.patch_embed.grid_size
    base = swin.patch_embed(images)
    prompt = swin.patch_embed.norm(model.prompt_map()).reshape(1, height, width, -1)
    prompt = prompt.expand(images.shape[0], -1, -1, -1)
    for s, stage in enumerate(swin.layers):
        base, prompt = stage.downsample(base), stage.downsample(prompt)
        for i, block in enumerate(stage.blocks):
            if s not in model.to_prompt:
                base, prompt = block(base), block(prompt)
            elif i in model.to_prompt[s]:
                fused = _naive_swin_cross(model.cross[str(s)][i], block, query=prompt, other=base)
                prompt = block(prompt)
                base = block(base)
                prompt = prompt + model.gamma * fused
            else:
                fused = _naive_swin_cross(model.cross[str(s)][i], block, query=base, other=prompt)
                prompt = block(prompt)
                base = block(base)
                base = base + model.gamma * fused
    pooled = [swin.forward_head(swin.norm(x), pre_logits=True) for x in (base, prompt)]
    return model.head(pooled[0]), model.head(pooled[1])


def _naive_swin_cross(cross, block, query, other):
    attn = block.attn
    batch, height, width, dim = query.shape

    def heads(x, which):
        # The release normalises with a separate LayerNorm(ε = 1e-6) loaded from norm1 (timm's norm1: 1e-5).
        norm = torch.nn.LayerNorm(dim, eps=1e-6)
        norm.load_state_dict(block.norm1.state_dict())
        qkv = F.linear(norm(x.reshape(batch, height * width, dim)), attn.qkv.weight, attn.qkv.bias)
        part = qkv.chunk(3, dim=-1)[which]
        return part.reshape(batch, height * width, attn.num_heads, -1).transpose(1, 2)

    q, k, v = heads(query, 0), heads(other, 1), heads(other, 2)
    attended = naive_cross_attention(q, k, v, cross.grid, cross.window, 0, cross.border, cross.head_mode)
    fused = cross.adapter(attn.proj(attended) + query.reshape(batch, height * width, dim))
    return fused.reshape(batch, height, width, dim)
