"""The local attention as fused Triton kernels: every patch query reads its c×c window of keys straight from the
key map — no pads, halo copies, masks or score matrices — with an online softmax, and the backward likewise.

Forward, one program per block of queries of one (batch, head): for each of the c² window offsets it gathers the
neighbours' keys and values, scores them and folds them into a running softmax (centre first, so the running
maximum is finite from the start). It keeps the log-sum-exp per query for the backward.

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
    idx = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = idx < tokens
    row, col = idx // width, idx % width
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim

    q_ptrs = q_ptr + b * sqb + h * sqh + idx[:, None] * sqn + dims[None, :] * sqd
    q = tl.load(q_ptrs, mask=valid[:, None] & dim_ok[None, :], other=0.0).to(tl.float32) * scale
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh

    # The centre (always inside the grid) starts the running softmax: max = its score, sum = 1.
    centre = tl.where(valid, idx, 0)
    kv_mask = valid[:, None] & dim_ok[None, :]
    k = tl.load(k_base + centre[:, None] * skn + dims[None, :] * skd, mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(v_base + centre[:, None] * svn + dims[None, :] * svd, mask=kv_mask, other=0.0).to(tl.float32)
    running_max = tl.sum(q * k, axis=1)
    running_sum = tl.full([BLOCK_Q], 1.0, tl.float32)
    acc = v
    for dy in tl.static_range(-RADIUS, RADIUS + 1):
        for dx in tl.static_range(-RADIUS, RADIUS + 1):
            if dy != 0 or dx != 0:
                key_row, key_col = row + dy, col + dx
                inside = valid & (key_row >= 0) & (key_row < height) & (key_col >= 0) & (key_col < width)
                key = tl.where(inside, key_row * width + key_col, 0)
                load_mask = inside[:, None] & dim_ok[None, :]
                k = tl.load(k_base + key[:, None] * skn + dims[None, :] * skd, mask=load_mask, other=0.0)
                v = tl.load(v_base + key[:, None] * svn + dims[None, :] * svd, mask=load_mask, other=0.0)
                score = tl.sum(q * k.to(tl.float32), axis=1)
                if not ZERO_BORDER:
                    score = tl.where(inside, score, float("-inf"))
                new_max = tl.maximum(running_max, score)
                rescale = tl.exp(running_max - new_max)
                weight = tl.exp(score - new_max)
                running_sum = running_sum * rescale + weight
                acc = acc * rescale[:, None] + weight[:, None] * v.to(tl.float32)
                running_max = new_max

    out = acc / running_sum[:, None]
    o_ptrs = out_ptr + b * sob + h * soh + idx[:, None] * son + dims[None, :] * sod
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & dim_ok[None, :])
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
    idx = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = idx < tokens
    row, col = idx // width, idx % width
    dims = tl.arange(0, BLOCK_D)
    row_mask = valid[:, None] & (dims < head_dim)[None, :]

    q = tl.load(q_ptr + b * sqb + h * sqh + idx[:, None] * sqn + dims[None, :] * sqd, mask=row_mask, other=0.0)
    q = q.to(tl.float32) * scale
    grad_out = tl.load(
        grad_out_ptr + b * sob + h * soh + idx[:, None] * son + dims[None, :] * sod, mask=row_mask, other=0.0
    )
    grad_out = grad_out.to(tl.float32)
    out = tl.load(out_ptr + b * sob + h * soh + idx[:, None] * son + dims[None, :] * sod, mask=row_mask, other=0.0)
    delta = tl.sum(grad_out * out.to(tl.float32), axis=1)
    lse = tl.load(lse_ptr + batch_head * tokens + idx, mask=valid, other=0.0)
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh

    grad_q = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for dy in tl.static_range(-RADIUS, RADIUS + 1):
        for dx in tl.static_range(-RADIUS, RADIUS + 1):
            key_row, key_col = row + dy, col + dx
            inside = valid & (key_row >= 0) & (key_row < height) & (key_col >= 0) & (key_col < width)
            key = tl.where(inside, key_row * width + key_col, 0)
            load_mask = inside[:, None] & (dims < head_dim)[None, :]
            k = tl.load(k_base + key[:, None] * skn + dims[None, :] * skd, mask=load_mask, other=0.0).to(tl.float32)
            v = tl.load(v_base + key[:, None] * svn + dims[None, :] * svd, mask=load_mask, other=0.0).to(tl.float32)
            prob = tl.where(inside, tl.exp(tl.sum(q * k, axis=1) - lse), 0.0)
            grad_score = prob * (tl.sum(grad_out * v, axis=1) - delta)
            grad_q += grad_score[:, None] * k

    dq_ptrs = grad_q_ptr + b * sgb + h * sgh + idx[:, None] * sgn + dims[None, :] * sgd
    tl.store(dq_ptrs, (grad_q * scale).to(grad_q_ptr.dtype.element_ty), mask=row_mask)
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
    idx = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = idx < tokens
    row, col = idx // width, idx % width
    dims = tl.arange(0, BLOCK_D)
    row_mask = valid[:, None] & (dims < head_dim)[None, :]

    k = tl.load(k_ptr + b * skb + h * skh + idx[:, None] * skn + dims[None, :] * skd, mask=row_mask, other=0.0)
    k = k.to(tl.float32)
    v = tl.load(v_ptr + b * svb + h * svh + idx[:, None] * svn + dims[None, :] * svd, mask=row_mask, other=0.0)
    v = v.to(tl.float32)
    q_base, do_base = q_ptr + b * sqb + h * sqh, grad_out_ptr + b * sob + h * soh

    grad_k = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for dy in tl.static_range(-RADIUS, RADIUS + 1):
        for dx in tl.static_range(-RADIUS, RADIUS + 1):
            query_row, query_col = row + dy, col + dx
            inside = valid & (query_row >= 0) & (query_row < height) & (query_col >= 0) & (query_col < width)
            query = tl.where(inside, query_row * width + query_col, 0)
            load_mask = inside[:, None] & (dims < head_dim)[None, :]
            q = tl.load(q_base + query[:, None] * sqn + dims[None, :] * sqd, mask=load_mask, other=0.0)
            q = q.to(tl.float32) * scale
            grad_out = tl.load(do_base + query[:, None] * son + dims[None, :] * sod, mask=load_mask, other=0.0)
            grad_out = grad_out.to(tl.float32)
            lse = tl.load(lse_ptr + batch_head * tokens + query, mask=inside, other=0.0)
            delta = tl.load(delta_ptr + batch_head * tokens + query, mask=inside, other=0.0)
            prob = tl.where(inside, tl.exp(tl.sum(q * k, axis=1) - lse), 0.0)
            grad_v += prob[:, None] * grad_out
            grad_score = prob * (tl.sum(grad_out * v, axis=1) - delta)
            grad_k += grad_score[:, None] * q  # q already carries the scale

    offsets = b * sgb + h * sgh + idx[:, None] * sgn + dims[None, :] * sgd
    tl.store(grad_k_ptr + offsets, grad_k.to(grad_k_ptr.dtype.element_ty), mask=row_mask)
    tl.store(grad_v_ptr + offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=row_mask)


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
