"""Spatially-aligned cross attention (method file §2, "LocalAttn").

A patch query at grid position ⟨y, x⟩ attends only to the patch keys of the other pathway inside the
c×c window centred on ⟨y, x⟩; prefix queries (CLS) attend globally to every token of the other pathway.

Four kernels, no loop over tokens or windows, chosen by `choose_kernel`:

- tiled: the query grid is cut into tiles of T×T positions and each tile attends to its (T+c−1)×(T+c−1) "halo"
  of keys under a fixed boolean mask, so every tile is one small dense attention problem and all tiles run as a
  single batched `scaled_dot_product_attention` call. Work is O(N·(T+c−1)²·d) with T = max(c, 7), i.e.
  O(N·c²·d), and memory stays linear in N (the halo copies of K and V are at most (1+(c−1)/T)² ≈ 4× the key map;
  the fused attention kernels never materialise scores on GPU).
- dense: every patch query against every patch key under a fixed (N × N) window mask — O(N²·d) work, but one
  attention call on the maps as they are, with none of the tiled path's pads, halo copies and their backward.
  On a small grid that is cheaper.
- flex: PyTorch's FlexAttention with a block mask built from the window: a fused Triton kernel (compiled on
  first use) that skips the key blocks no query of a query block can see and never materialises scores. It has
  no backward on the CPU, so it is a GPU kernel; on the CPU it runs forward only (for checking). On the grids
  that occur it measured slower than dense (see DENSE_MAX_TOKENS), so it is offered, not chosen.
- triton: this project's fused Triton kernels (`local_attention_triton`): each query reads its c×c window of
  keys straight from the key map, O(N·c²·d) with no copies, masks or score matrices, forward and backward.
  CUDA only (or the CPU under TRITON_INTERPRET=1, for the tests). Not yet measured on a GPU, so not chosen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F

Border = Literal["clip", "zero"]
HeadMode = Literal["multi", "single"]

Kernel = Literal["tiled", "dense", "flex", "triton"]
KERNELS: tuple[Kernel, ...] = ("tiled", "dense", "flex", "triton")

# Tiles are at least this wide: small enough that the halo overhead stays low for c ≤ 7, large enough
# that each tile is a reasonably shaped matrix product.
MIN_TILE = 7
# The dense kernel up to this many patch tokens; the tiled one above. Measured, forward + backward of one call:
# - CPU (this project's 2 cores, fp32): 8×8 grid (the offline backbone), batch 64, c = 3: dense 6.9 ms, tiled
#   23.6 ms; 14×14 (ViT-B/16), batch 4: equal for c = 3, dense 11 % slower at c = 7; 24×24: tiled 18 % faster.
# - GPU (one H200, bf16, batch 64; benchmarks/local_attention.py, results in benchmarks/results/h200-2026-11-30):
#   dense was the fastest of the three kernels on every grid measured, 14×14 (ViT-B/16 and Swin-B stage 3) and
#   24×24 (ViT-B/16 at 384), c = 3 and 7: 2.1–3.9× faster than tiled, 1.4–2.3× faster than flex. Larger grids
#   were not measured; there the dense kernel's N² work and mask grow, so they keep the tiled kernel.
DENSE_MAX_TOKENS = {"cpu": 144, "cuda": 576}


def choose_kernel(grid: tuple[int, int], device: torch.device) -> Kernel:
    """The kernel for this grid on this device (see DENSE_MAX_TOKENS). Flex is never chosen: it was slower than
    dense on every grid measured; nor is triton, not measured yet. `SpatialCrossBlock.kernel` pins either."""
    return "dense" if grid[0] * grid[1] <= DENSE_MAX_TOKENS.get(device.type, 0) else "tiled"


def spatial_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window: int | None,
    num_prefix: int = 1,
    border: Border = "clip",
    head_mode: HeadMode = "multi",
    tile_mask: torch.Tensor | None = None,
    dense_mask: torch.Tensor | None = None,
    kernel: Kernel | None = None,
) -> torch.Tensor:
    """Cross attention of queries ``q`` over keys/values ``k, v`` of the other pathway.

    Args:
        q, k, v: per-head projections, shape (B, H, num_prefix + h*w, D); the grid is row-major.
        grid: (h, w) token grid of the patch tokens.
        window: odd window size c, or None for the global variant (every query sees every token).
        num_prefix: leading non-spatial tokens (CLS, registers); they query globally.
        border: "clip" drops window positions outside the grid; "zero" pads the key/value map with
            zeros there, so they score 0 and take softmax mass (the release's accelerated variant).
        head_mode: "multi" keeps the backbone's heads (scale D^-½); "single" views all H·D channels as one
            head (scale (H·D)^-½).
        tile_mask, dense_mask: what `build_tile_mask(...)` / `build_dense_mask(...)` return for these arguments;
            pass them precomputed to keep the call free of Python-side caching (e.g. under torch.compile). Built
            and cached when omitted.
        kernel: "tiled", "dense", "flex" or "triton" (the same maths); None: `choose_kernel` for the grid and q's
            device.

    Returns:
        Attention output with heads merged, shape (B, num_prefix + h*w, H*D), before the output projection.
    """
    batch, heads, length, head_dim = q.shape
    height, width = grid
    if length != num_prefix + height * width or k.shape[2] != length:
        raise ValueError(f"token count {length} does not match num_prefix={num_prefix} + grid {height}x{width}")
    if head_mode == "single":
        q, k, v = (_one_wide_head(t) for t in (q, k, v))

    if window is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        patches = q[:, :, num_prefix:], k[:, :, num_prefix:], v[:, :, num_prefix:]
        kernel = kernel or choose_kernel(grid, q.device)
        if kernel == "dense":
            if dense_mask is None:
                dense_mask = build_dense_mask(grid, window, border, q.device)
            out = _dense_windowed_attention(*patches, border, dense_mask)
        elif kernel == "flex":
            out = _flex_windowed_attention(*patches, grid, window, border)
        elif kernel == "triton":
            out = _triton_windowed_attention(*patches, grid, window, border)
        else:
            if tile_mask is None:
                tile_mask = build_tile_mask(grid, window, border, q.shape[1], q.device)
            out = _windowed_attention(*patches, grid, window, tile_mask)
        if num_prefix:  # Swin has no prefix tokens; skip the empty global-attention call
            prefix_out = F.scaled_dot_product_attention(q[:, :, :num_prefix], k, v)
            out = torch.cat([prefix_out, out], dim=2)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _one_wide_head(t: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = t.shape
    return t.transpose(1, 2).reshape(batch, 1, length, heads * head_dim)


def _windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Patch queries over their c×c key window, all tiles in one batched attention call."""
    batch, heads, _, dim = q.shape
    height, width = grid
    radius = window // 2
    (tile_h, tile_w), (tiles_y, tiles_x) = _tiling(grid, window)
    pad_h, pad_w = tiles_y * tile_h - height, tiles_x * tile_w - width
    halo_h, halo_w = tile_h + 2 * radius, tile_w + 2 * radius

    # Queries: (B, H, h, w, D) -> padded to whole tiles -> (B, tiles·H, tile_h·tile_w, D).
    q_grid = q.reshape(batch, heads, height, width, dim)
    if pad_h or pad_w:
        q_grid = F.pad(q_grid, (0, 0, 0, pad_w, 0, pad_h))
    q_tiles = (
        q_grid.reshape(batch, heads, tiles_y, tile_h, tiles_x, tile_w, dim)
        .permute(0, 2, 4, 1, 3, 5, 6)
        .reshape(batch, tiles_y * tiles_x * heads, tile_h * tile_w, dim)
    )

    def halo_tiles(t: torch.Tensor) -> torch.Tensor:
        # Zero padding doubles as the "zero" border; under "clip" the mask hides it.
        padded = F.pad(
            t.reshape(batch, heads, height, width, dim),
            (0, 0, radius, pad_w + radius, radius, pad_h + radius),
        )
        windows = padded.unfold(2, halo_h, tile_h).unfold(3, halo_w, tile_w)  # B,H,ty,tx,D,hh,hw
        return windows.permute(0, 2, 3, 1, 5, 6, 4).reshape(batch, tiles_y * tiles_x * heads, halo_h * halo_w, dim)

    out = F.scaled_dot_product_attention(q_tiles, halo_tiles(k), halo_tiles(v), attn_mask=mask)

    out = (
        out.reshape(batch, tiles_y, tiles_x, heads, tile_h, tile_w, dim)
        .permute(0, 3, 1, 4, 2, 5, 6)
        .reshape(batch, heads, tiles_y * tile_h, tiles_x * tile_w, dim)
    )
    if pad_h or pad_w:
        out = out[:, :, :height, :width]
    return out.reshape(batch, heads, height * width, dim)


def _dense_windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, border: Border, mask: torch.Tensor
) -> torch.Tensor:
    """Patch queries over all patch keys under the window mask. Under the "zero" border the window's positions
    outside the grid are zero keys (score 0) with zero values: one extra all-zero key stands for them, its
    score raised by log(how many) through the mask, so the softmax gives it exactly their mass."""
    if border == "zero":
        k, v = _with_zero_key(k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask.dtype == torch.bool else mask.to(q.dtype))


def _with_zero_key(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v with one all-zero key/value appended: it stands for the window's positions outside the grid under
    the "zero" border (its score is raised by log(how many) through the mask or score_mod)."""
    zero = k.new_zeros(*k.shape[:2], 1, k.shape[3])
    return torch.cat([k, zero], dim=2), torch.cat([v, zero], dim=2)


def _flex_windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int, border: Border
) -> torch.Tensor:
    """Patch queries over their window through FlexAttention. The "zero" border is the dense kernel's: one extra
    all-zero key whose score is log(count of the window's positions outside the grid)."""
    block_mask, score_mod = build_flex_mask(grid, window, border, q.device)
    if border == "zero":
        k, v = _with_zero_key(k, v)
    return _flex_attention(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _triton_windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int, border: Border
) -> torch.Tensor:
    """Patch queries over their window through the fused Triton kernels (imported on first use: Triton is only
    needed by whoever pins this kernel)."""
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the triton local-attention kernel runs on CUDA tensors (got {q.device.type}); "
            "on the CPU only under TRITON_INTERPRET=1 (slow, for tests)"
        )
    from sa2vp.models.local_attention_triton import triton_windowed_attention

    return triton_windowed_attention(q, k, v, grid, window, zero_border=border == "zero")


@lru_cache(maxsize=4)
def _flex_attention(device: torch.device) -> Callable[..., torch.Tensor]:
    """FlexAttention as it runs fast: compiled on a GPU (its fused Triton kernel); eager (the reference maths,
    forward only) on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = flex_attention if device.type == "cpu" else torch.compile(flex_attention, dynamic=False)
    return cast(Callable[..., torch.Tensor], compiled)


@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached: a mask first built under inference_mode must still serve autograd
def build_flex_mask(grid: tuple[int, int], window: int, border: Border, device: torch.device) -> tuple[Any, Any]:
    """(BlockMask, score_mod) for FlexAttention over the patch tokens: a query sees the keys of its window;
    under "zero" also the extra zero key (index h·w) where its window leaves the grid, scored log(count of those
    positions) by the score_mod (None under "clip"). Cached, so the compiled kernel sees the same functions on
    every call and is not recompiled."""
    from torch.nn.attention.flex_attention import create_block_mask

    height, width = grid
    radius, patches = window // 2, height * width
    rows = torch.arange(patches, device=device) // width
    cols = torch.arange(patches, device=device) % width
    inside = (rows.clamp(max=radius) + (height - 1 - rows).clamp(max=radius) + 1) * (
        cols.clamp(max=radius) + (width - 1 - cols).clamp(max=radius) + 1
    )
    outside = window * window - inside
    zero_key_score = torch.where(outside > 0, outside.float().log(), torch.tensor(float("-inf"), device=device))

    def in_window(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        key = kv.clamp(max=patches - 1)
        near = ((rows[qi] - rows[key]).abs() <= radius) & ((cols[qi] - cols[key]).abs() <= radius) & (kv < patches)
        return near if border == "clip" else near | ((kv == patches) & (outside[qi] > 0))

    def zero_key(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return torch.where(kv == patches, zero_key_score[qi].to(score.dtype), score)

    keys = patches + (border == "zero")
    block_mask = create_block_mask(in_window, B=None, H=None, Q_LEN=patches, KV_LEN=keys, device=device)
    return block_mask, (None if border == "clip" else zero_key)


@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached: a mask first built under inference_mode must still serve autograd
def build_dense_mask(grid: tuple[int, int], window: int, border: Border, device: torch.device) -> torch.Tensor:
    """The dense kernel's mask over (patch queries, patch keys): boolean True where a query may attend
    ("clip"); for "zero" an additive float mask (0 / −inf) with one more column for the zero key, log(count of
    the window's positions outside the grid), −inf where there are none."""
    height, width = grid
    radius = window // 2
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    allowed = ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)
    if border == "clip":
        return allowed.to(device)
    outside = window * window - allowed.sum(dim=1, keepdim=True)
    scores = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))
    zero_key = torch.where(outside > 0, outside.float().log(), torch.tensor(float("-inf")))
    return torch.cat([scores, zero_key], dim=1).to(device)


def _tiling(grid: tuple[int, int], window: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((tile rows, tile columns), (tiles down, tiles across)) for a grid and window."""
    return tuple(zip(_tile_side(grid[0], window), _tile_side(grid[1], window), strict=True))  # type: ignore[return-value]


def _tile_side(length: int, window: int) -> tuple[int, int]:
    """(tile side, tile count) along one grid axis: tiles of about MIN_TILE (at least the window), split
    evenly so the padding to a whole number of tiles is minimal (8 → 2 tiles of 4, not 2 of 7)."""
    count = math.ceil(length / max(window, MIN_TILE))
    side = min(length, max(window, math.ceil(length / count)))
    return side, math.ceil(length / side)


@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached: a mask first built under inference_mode must still serve autograd
def build_tile_mask(
    grid: tuple[int, int], window: int, border: Border, heads: int, device: torch.device
) -> torch.Tensor:
    """Boolean mask (1, tiles·heads, tile positions, halo positions): True where a query may attend.

    `heads` is the number of heads the attention runs with (1 in single-head mode)."""
    height, width = grid
    radius = window // 2
    (tile_h, tile_w), (tiles_y, tiles_x) = _tiling(grid, window)
    halo_h, halo_w = tile_h + 2 * radius, tile_w + 2 * radius
    qi, qj = torch.meshgrid(torch.arange(tile_h), torch.arange(tile_w), indexing="ij")
    ki, kj = torch.meshgrid(torch.arange(halo_h), torch.arange(halo_w), indexing="ij")
    qi, qj, ki, kj = qi.reshape(-1, 1), qj.reshape(-1, 1), ki.reshape(1, -1), kj.reshape(1, -1)
    # Halo position u sits at u - radius relative to the tile origin: inside the window iff 0 <= u - i <= 2r.
    in_window = (ki - qi >= 0) & (ki - qi <= 2 * radius) & (kj - qj >= 0) & (kj - qj <= 2 * radius)

    ty, tx = torch.meshgrid(torch.arange(tiles_y), torch.arange(tiles_x), indexing="ij")
    ty, tx = ty.reshape(-1, 1, 1), tx.reshape(-1, 1, 1)
    key_y, key_x = ty * tile_h + ki - radius, tx * tile_w + kj - radius
    key_inside = (key_y >= 0) & (key_y < height) & (key_x >= 0) & (key_x < width)
    # Queries in the padding that rounds the grid up to whole tiles are discarded afterwards; letting
    # them see their whole window keeps every softmax row non-empty (an empty row would give NaN).
    query_outside = (ty * tile_h + qi >= height) | (tx * tile_w + qj >= width)
    if border == "clip":
        allowed = in_window & (key_inside | query_outside)
    else:
        allowed = in_window.expand(tiles_y * tiles_x, -1, -1)
    allowed = allowed.unsqueeze(1).expand(-1, heads, -1, -1)
    return allowed.reshape(1, tiles_y * tiles_x * heads, tile_h * tile_w, halo_h * halo_w).to(device)
