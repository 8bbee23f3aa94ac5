"""The fast spatially-aligned cross attention against the naive per-token reference."""

from __future__ import annotations

import pytest
import torch

from sa2vp.models.local_attention import choose_kernel, spatial_cross_attention
from tests.reference import naive_cross_attention

TOLERANCE = 1e-5


def _inputs(grid, heads=2, head_dim=4, batch=2, num_prefix=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    length = num_prefix + grid[0] * grid[1]
    return [
        torch.randn(batch, heads, length, head_dim, generator=generator, dtype=torch.float32).requires_grad_()
        for _ in range(3)
    ]


def _forward_and_grads(fn, tensors, upstream, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    (out * upstream).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


# A square grid, a non-square one, and one larger than a tile (several tiles plus rounding padding).
GRIDS = [(5, 5), (4, 6), (9, 8)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("window", [1, 3, 5, 7, None], ids=lambda c: f"c{c or 'global'}")
@pytest.mark.parametrize("head_mode", ["multi", "single"])
@pytest.mark.parametrize("border", ["clip", "zero"])
@pytest.mark.parametrize("kernel", ["tiled", "dense"])
def test_fast_path_matches_naive_reference(grid, window, head_mode, border, kernel):
    q, k, v = _inputs(grid)
    kwargs = dict(grid=grid, window=window, num_prefix=1, border=border, head_mode=head_mode)
    upstream = torch.randn(q.shape[0], q.shape[2], q.shape[1] * q.shape[3], generator=torch.Generator().manual_seed(1))

    fast_out, fast_grads = _forward_and_grads(spatial_cross_attention, (q, k, v), upstream, kernel=kernel, **kwargs)
    ref_out, ref_grads = _forward_and_grads(naive_cross_attention, (q, k, v), upstream, **kwargs)

    assert fast_out.dtype == torch.float32
    assert (fast_out - ref_out).abs().max().item() <= TOLERANCE
    for name, fast, ref in zip("qkv", fast_grads, ref_grads, strict=True):
        assert (fast - ref).abs().max().item() <= TOLERANCE, f"gradient of {name}"


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("window", [1, 3, 5, 7], ids=lambda c: f"c{c}")
@pytest.mark.parametrize("head_mode", ["multi", "single"])
@pytest.mark.parametrize("border", ["clip", "zero"])
def test_flex_forward_matches_naive_reference(grid, window, head_mode, border):
    # FlexAttention's gradients are checked on a GPU: tests/test_local_attention_gpu.py.
    q, k, v = (t.detach() for t in _inputs(grid, head_dim=16))
    kwargs = dict(grid=grid, window=window, num_prefix=1, border=border, head_mode=head_mode)
    fast = spatial_cross_attention(q, k, v, kernel="flex", **kwargs)
    ref = naive_cross_attention(q, k, v, **kwargs)
    assert (fast - ref).abs().max().item() <= TOLERANCE


def test_window_one_reads_exactly_the_aligned_partner():
    grid = (3, 4)
    q, k, v = (t.detach() for t in _inputs(grid, heads=1, head_dim=8))
    out = spatial_cross_attention(q, k, v, grid, window=1, num_prefix=1)
    torch.testing.assert_close(out[:, 1:], v[:, 0, 1:], rtol=0, atol=1e-6)


def test_clip_and_zero_borders_differ_only_where_the_window_leaves_the_grid():
    grid = (6, 6)
    q, k, v = (t.detach() for t in _inputs(grid))
    clip = spatial_cross_attention(q, k, v, grid, window=3, border="clip")
    zero = spatial_cross_attention(q, k, v, grid, window=3, border="zero")
    patch_diff = (clip - zero)[:, 1:].abs().amax(dim=(0, 2)).reshape(grid)
    interior = patch_diff[1:-1, 1:-1]
    assert interior.max() < 1e-6
    assert patch_diff[0].min() > 1e-4 and patch_diff[:, -1].min() > 1e-4
    torch.testing.assert_close(clip[:, 0], zero[:, 0])  # CLS attends globally either way


def test_cls_query_is_global_while_patch_queries_are_local():
    grid = (5, 5)
    q, k, v = (t.detach() for t in _inputs(grid))
    base = spatial_cross_attention(q, k, v, grid, window=3)
    v_far = v.clone()
    v_far[:, :, 1 + 4 * 5 + 4] += 10.0  # the bottom-right patch token
    moved = spatial_cross_attention(q, k, v_far, grid, window=3)
    changed = (moved - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed[0], "CLS must see every token"
    assert not changed[1], "the top-left patch query must not see the bottom-right token"
    assert changed[1 + 3 * 5 + 3], "the diagonal neighbour sees it"


def test_token_count_must_match_the_grid():
    q, k, v = (t.detach() for t in _inputs((4, 4)))
    with pytest.raises(ValueError, match="does not match"):
        spatial_cross_attention(q, k, v, (5, 4), window=3)


def test_the_kernel_is_chosen_by_grid_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_kernel((8, 8), cpu) == "dense"  # the offline backbone: dense measured 3.4x faster here
    assert choose_kernel((24, 24), cpu) == "tiled"
    # Measured on an H200: dense fastest up to 24x24 (ViT-B/16 at 384); larger grids keep the tiled kernel.
    assert choose_kernel((14, 14), cuda) == choose_kernel((24, 24), cuda) == "dense"
    assert choose_kernel((25, 24), cuda) == "tiled"
    assert choose_kernel((8, 8), torch.device("mps")) == "tiled"  # not measured there


@pytest.mark.parametrize("kernel", ["tiled", "dense"])
def test_masks_first_built_under_inference_mode_still_serve_training(kernel):
    # The masks are cached per grid: one built while evaluating (inference_mode) must not break the next
    # training step (autograd cannot save inference tensors). A grid no other test uses, so the cache is cold.
    grid = (3, 7)
    q, k, v = _inputs(grid)
    with torch.inference_mode():
        spatial_cross_attention(q, k, v, grid, window=3, border="zero", kernel=kernel)
    spatial_cross_attention(q, k, v, grid, window=3, border="zero", kernel=kernel).sum().backward()
    assert q.grad is not None


def test_flex_masks_are_built_outside_inference_mode():
    from sa2vp.models.local_attention import build_flex_mask

    with torch.inference_mode():
        block_mask, _ = build_flex_mask((3, 5), 3, "zero", torch.device("cpu"))
    assert not block_mask.kv_num_blocks.is_inference()


def test_a_cross_block_carries_both_kernels_masks_and_uses_the_chosen_one():
    from sa2vp.models.cross_block import SpatialCrossBlock

    block = SpatialCrossBlock(
        dim=8,
        num_heads=2,
        grid=(4, 4),
        num_prefix=1,
        window=3,
        border="zero",
        head_mode="multi",
        adapter_dim=4,
        activation="gelu",
        dropout=0.0,
    )
    assert block.tile_mask is not None and block.dense_mask.shape == (16, 17)
    q, k, v = (t.detach() for t in _inputs((4, 4)))
    expected = naive_cross_attention(q, k, v, grid=(4, 4), window=3, num_prefix=1, border="zero", head_mode="multi")
    identity = lambda x: x  # noqa: E731
    block.adapter = None
    got = block(q, k, v, torch.zeros(2, 17, 8), identity)
    assert (got - expected).abs().max().item() <= TOLERANCE
