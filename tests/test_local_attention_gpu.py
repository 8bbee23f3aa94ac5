"""Every local-attention kernel on a GPU against the naive reference, forward and gradients.

Skipped without CUDA (CI has none); `benchmarks/gpu_check.sh` runs it on a lent GPU. FlexAttention is here
because it has no backward on the CPU (the CPU tests cover its forward); the Triton kernels because the CPU tests
run them through Triton's interpreter, not compiled.
"""

from __future__ import annotations

import pytest
import torch

from sa2vp.models.local_attention import KERNELS, spatial_cross_attention
from tests.reference import naive_cross_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp32 on the GPU: the fused kernels sum in another order than the reference.
TOLERANCE = 1e-4
GRIDS = [(5, 5), (9, 8), (14, 14)]


# Every combination for the kernels without compilation; FlexAttention compiles a kernel per mask (seconds
# each), so a few cases that cover both borders, both head modes, several tiles and the widest window.
CASES = [
    (kernel, grid, window, head_mode, border)
    for kernel in KERNELS
    if kernel != "flex"
    for grid in GRIDS
    for window in (1, 3, 7)
    for head_mode in ("multi", "single")
    for border in ("clip", "zero")
] + [
    ("flex", (9, 8), 3, "multi", "clip"),
    ("flex", (14, 14), 7, "multi", "zero"),
    ("flex", (9, 8), 3, "single", "zero"),
    ("flex", (5, 5), 1, "multi", "clip"),
]


@pytest.mark.parametrize(("kernel", "grid", "window", "head_mode", "border"), CASES, ids=str)
def test_kernel_matches_naive_reference_on_gpu(kernel, grid, window, head_mode, border):
    generator = torch.Generator().manual_seed(0)
    length = 1 + grid[0] * grid[1]
    inputs = [torch.randn(2, 4, length, 16, generator=generator) for _ in range(3)]
    upstream = torch.randn(2, length, 64, generator=generator)
    kwargs = dict(grid=grid, window=window, num_prefix=1, border=border, head_mode=head_mode)

    def run(fn, device, **extra):
        leaves = [t.to(device).requires_grad_() for t in inputs]
        out = fn(*leaves, **kwargs, **extra)
        (out * upstream.to(device)).sum().backward()
        return [t.detach().cpu() for t in (out, *(leaf.grad for leaf in leaves))]

    fast = run(spatial_cross_attention, "cuda", kernel=kernel)
    reference = run(naive_cross_attention, "cpu")
    for name, got, expected in zip(["output", "dq", "dk", "dv"], fast, reference, strict=True):
        assert (got - expected).abs().max().item() <= TOLERANCE, name
