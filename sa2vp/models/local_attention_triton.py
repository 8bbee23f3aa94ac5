"""The local attention as fused Triton kernels: every patch query reads its c×c window of keys straight from the
key map — no pads, halo copies, masks or score matrices — with an online softmax, and the backward likewise.

Forward, one program per block of queries of one (batch, head): for each of the c² window offsets it gathers the
neighbours' keys and values, scores them and folds them into a running softmax. It keeps the log-sum-exp per
query for the backward. The offsets are a loop in the compiled code, not unrolled, so a kernel compiles in the
same seconds for every c (unrolled, c = 7 took minutes).

Backward, two kernels and no atomics (deterministic):
- per query block: dQ over the window, and δ = rowsum(dO ∘ O) for the second kernel;
- per key block: dK and dV from the queries that see the key. The window is symmetric (query i sees key j iff
  |Δrow| ≤ r and |Δcol| ≤ r), so those queries are the key's own window, gathered the same way.

Borders: under "clip" a window position outside the grid is dropped (score −inf); under "zero" it is a zero key
with a zero value (score 0, nothing added): the masked loads return zeros there, so only the score's mask
differs. Zero keys have no gradient, so the backward only ever visits positions inside the grid.

Triton runs on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1` (set before this module is imported;
the tests do that). Nothing here chooses this kernel: `local_attention.choose_kernel` chooses by measurements,
and this kernel has not been measured on a GPU yet (`benchmarks/local_attention.py` times it where Triton runs).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# Queries per program and warps: a 64-wide head keeps q, the accumulator and one gathered key/value block in
# registers; a wide single head (H·D = 768 → 1024 lanes) takes fewer rows and more warps. Not tuned on a GPU.
_WIDE_HEAD = 128


def _launch_shape(q: torch.Tensor) -> tuple[tuple[int, int], dict[str, int]]:
    """The launch grid (query blocks, batch·heads) and the block sizes and warps for q's head width."""
    batch, heads, tokens, head_dim = q.shape
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_q, warps = (64, 4) if block_d <= _WIDE_HEAD else (16, 8)
    return (triton.cdiv(tokens, block_q), batch * heads), {"BLOCK_Q": block_q, "BLOCK_D": block_d, "num_warps": warps}


@triton.jit
def _block_positions(block, tokens, width, BLOCK_Q: tl.constexpr):
    """The block's token indices, which of them exist, and their grid rows and columns."""
    idx = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return idx, idx < tokens, idx // width, idx % width


@triton.jit
def _neighbour(row, col, dy, dx, valid, height, width):
    """The token at (row + dy, col + dx) and whether it is inside the grid (index 0 where it is not)."""
    near_row, near_col = row + dy, col + dx
    inside = valid & (near_row >= 0) & (near_row < height) & (near_col >= 0) & (near_col < width)
    return tl.where(inside, near_row * width + near_col, 0), inside


@triton.jit
def _rows(base, index, stride_n, stride_d, present, head_dim, BLOCK_D: tl.constexpr):
    """Rows `index` of one (batch, head)'s (tokens, D) map, in fp32; zeros where `present` is False."""
    dims = tl.arange(0, BLOCK_D)
    mask = present[:, None] & (dims < head_dim)[None, :]
    return tl.load(base + index[:, None] * stride_n + dims[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(base, index, stride_n, stride_d, values, present, head_dim, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    mask = present[:, None] & (dims < head_dim)[None, :]
    tl.store(base + index[:, None] * stride_n + dims[None, :] * stride_d, values.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    heads, height, width, head_dim, scale,
    RADIUS: tl.constexpr, ZERO_BORDER: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    block, batch_head = tl.program_id(0), tl.program_id(1)
    b, h = batch_head // heads, batch_head % heads
    tokens = height * width
    idx, valid, row, col = _block_positions(block, tokens, width, BLOCK_Q)
    q_base, k_base, v_base = q_ptr + b * sqb + h * sqh, k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    q = _rows(q_base, idx, sqn, sqd, valid, head_dim, BLOCK_D) * scale

    # A running softmax over the window. It starts from a finite floor, not −inf: a position dropped under "clip"
    # scores −inf, and −inf − (−inf) would be NaN; the centre is always inside, so the sum ends ≥ 1.
    running_max = tl.full([BLOCK_Q], -1e30, tl.float32)
    running_sum = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for offset in range(0, (2 * RADIUS + 1) * (2 * RADIUS + 1)):  # a loop, not unrolled: c = 7 compiles as c = 1
        dy, dx = offset // (2 * RADIUS + 1) - RADIUS, offset % (2 * RADIUS + 1) - RADIUS
        key, inside = _neighbour(row, col, dy, dx, valid, height, width)
        # outside the grid the loads give zeros: under "zero" a zero key (score 0) with a zero value
        score = tl.sum(q * _rows(k_base, key, skn, skd, inside, head_dim, BLOCK_D), axis=1)
        if not ZERO_BORDER:
            score = tl.where(inside, score, float("-inf"))
        new_max = tl.maximum(running_max, score)
        rescale = tl.exp(running_max - new_max)
        weight = tl.exp(score - new_max)
        running_sum = running_sum * rescale + weight
        acc = acc * rescale[:, None] + weight[:, None] * _rows(v_base, key, svn, svd, inside, head_dim, BLOCK_D)
        running_max = new_max

    out_base = out_ptr + b * sob + h * soh
    _store_rows(out_base, idx, son, sod, acc / running_sum[:, None], valid, head_dim, BLOCK_D)
    tl.store(lse_ptr + batch_head * tokens + idx, running_max + tl.log(running_sum), mask=valid)


@triton.jit
def _backward_query_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_q_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sgb, sgh, sgn, sgd,
    heads, height, width, head_dim, scale,
    RADIUS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dQ, and δ = rowsum(dO ∘ O) per query for the key kernel. dO and O share the strides so*; dQ is
    contiguous (B, H, N, D) with strides sg*."""
    block, batch_head = tl.program_id(0), tl.program_id(1)
    b, h = batch_head // heads, batch_head % heads
    tokens = height * width
    idx, valid, row, col = _block_positions(block, tokens, width, BLOCK_Q)
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    q = _rows(q_ptr + b * sqb + h * sqh, idx, sqn, sqd, valid, head_dim, BLOCK_D) * scale
    grad_out = _rows(grad_out_ptr + b * sob + h * soh, idx, son, sod, valid, head_dim, BLOCK_D)
    delta = tl.sum(grad_out * _rows(out_ptr + b * sob + h * soh, idx, son, sod, valid, head_dim, BLOCK_D), axis=1)
    lse = tl.load(lse_ptr + batch_head * tokens + idx, mask=valid, other=0.0)

    grad_q = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for offset in range(0, (2 * RADIUS + 1) * (2 * RADIUS + 1)):
        dy, dx = offset // (2 * RADIUS + 1) - RADIUS, offset % (2 * RADIUS + 1) - RADIUS
        # zero keys (outside the grid) add nothing to dQ: their key is 0
        key, inside = _neighbour(row, col, dy, dx, valid, height, width)
        k = _rows(k_base, key, skn, skd, inside, head_dim, BLOCK_D)
        v = _rows(v_base, key, svn, svd, inside, head_dim, BLOCK_D)
        prob = tl.where(inside, tl.exp(tl.sum(q * k, axis=1) - lse), 0.0)
        grad_q += (prob * (tl.sum(grad_out * v, axis=1) - delta))[:, None] * k

    _store_rows(grad_q_ptr + b * sgb + h * sgh, idx, sgn, sgd, grad_q * scale, valid, head_dim, BLOCK_D)
    tl.store(delta_ptr + batch_head * tokens + idx, delta, mask=valid)


@triton.jit
def _backward_key_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sgb, sgh, sgn, sgd,
    heads, height, width, head_dim, scale,
    RADIUS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dK and dV of a block of keys, from the queries of each key's window (the window is symmetric). dK and dV
    are contiguous (B, H, N, D) with strides sg*."""
    block, batch_head = tl.program_id(0), tl.program_id(1)
    b, h = batch_head // heads, batch_head % heads
    tokens = height * width
    idx, valid, row, col = _block_positions(block, tokens, width, BLOCK_Q)
    q_base, do_base = q_ptr + b * sqb + h * sqh, grad_out_ptr + b * sob + h * soh
    k = _rows(k_ptr + b * skb + h * skh, idx, skn, skd, valid, head_dim, BLOCK_D)
    v = _rows(v_ptr + b * svb + h * svh, idx, svn, svd, valid, head_dim, BLOCK_D)

    grad_k = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for offset in range(0, (2 * RADIUS + 1) * (2 * RADIUS + 1)):
        dy, dx = offset // (2 * RADIUS + 1) - RADIUS, offset % (2 * RADIUS + 1) - RADIUS
        query, inside = _neighbour(row, col, dy, dx, valid, height, width)
        q = _rows(q_base, query, sqn, sqd, inside, head_dim, BLOCK_D) * scale
        grad_out = _rows(do_base, query, son, sod, inside, head_dim, BLOCK_D)
        lse = tl.load(lse_ptr + batch_head * tokens + query, mask=inside, other=0.0)
        delta = tl.load(delta_ptr + batch_head * tokens + query, mask=inside, other=0.0)
        prob = tl.where(inside, tl.exp(tl.sum(q * k, axis=1) - lse), 0.0)
        grad_v += prob[:, None] * grad_out
        grad_k += (prob * (tl.sum(grad_out * v, axis=1) - delta))[:, None] * q  # q carries the scale

    _store_rows(grad_k_ptr + b * sgb + h * sgh, idx, sgn, sgd, grad_k, valid, head_dim, BLOCK_D)
    _store_rows(grad_v_ptr + b * sgb + h * sgh, idx, sgn, sgd, grad_v, valid, head_dim, BLOCK_D)


class _WindowedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int, zero: bool
    ) -> torch.Tensor:
        batch, heads, tokens, head_dim = q.shape
        out = torch.empty(batch, heads, tokens, head_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch * heads, tokens, dtype=torch.float32, device=q.device)
        launch, sizes = _launch_shape(q)
        _forward_kernel[launch](
            q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, grid[0], grid[1], head_dim, head_dim**-0.5, RADIUS=window // 2, ZERO_BORDER=zero, **sizes,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.grid, ctx.window = grid, window
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        _, heads, _, head_dim = q.shape
        grad_out = grad_out.contiguous()  # shares O's (contiguous) strides in the kernels
        grad_q, grad_k, grad_v = (torch.empty(q.shape, dtype=t.dtype, device=q.device) for t in (q, k, v))
        delta = torch.empty_like(lse)
        launch, sizes = _launch_shape(q)
        sizes["RADIUS"] = ctx.window // 2
        geometry = (heads, ctx.grid[0], ctx.grid[1], head_dim, head_dim**-0.5)
        _backward_query_kernel[launch](
            q, k, v, out, grad_out, lse, delta, grad_q,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_q.stride(), *geometry, **sizes,
        )  # fmt: skip
        _backward_key_kernel[launch](
            q, k, v, grad_out, lse, delta, grad_k, grad_v,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_k.stride(), *geometry, **sizes,
        )  # fmt: skip
        return grad_q, grad_k, grad_v, None, None, None


def triton_windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int, zero_border: bool
) -> torch.Tensor:
    """Patch queries (B, H, h·w, D) over their c×c window of patch keys, any strides; returns (B, H, h·w, D)."""
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return _WindowedAttention.apply(q, k, v, grid, window, zero_border)
