"""The fused Triton local-attention kernels against the naive reference, forward and gradients, on this CPU
through Triton's interpreter (TRITON_INTERPRET=1). The same kernels compiled for a GPU are checked by
tests/test_local_attention_gpu.py.

The interpreter runs every program instance in Python, so the cases are chosen to cover, not to multiply: every
c, both borders, both head modes, a grid with a partial last query block, and inputs with the strides the model
passes (a view of the fused qkv projection).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sa2vp.models.local_attention import spatial_cross_attention
from tests.reference import naive_cross_attention

TOLERANCE = 1e-5
ROOT = Path(__file__).resolve().parents[1]


def _qkv_views(grid: tuple[int, int], heads: int, head_dim: int, batch: int = 2) -> list[torch.Tensor]:
    """q, k, v as the model has them: views into one (B, L, 3, H, D) projection, permuted to (B, H, L, D)."""
    length = 1 + grid[0] * grid[1]
    fused = torch.randn(batch, length, 3, heads, head_dim, generator=torch.Generator().manual_seed(0))
    return list(fused.permute(2, 0, 3, 1, 4).unbind(0))


def _output_and_grads(fn, tensors, upstream, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    (out * upstream).sum().backward()
    return [out.detach(), *(leaf.grad for leaf in leaves)]


CASES = [  # grid, window, head_mode, border
    ((5, 5), 1, "multi", "clip"),
    ((5, 5), 3, "multi", "clip"),
    ((5, 5), 3, "single", "zero"),
    ((4, 6), 5, "multi", "zero"),
    ((6, 5), 7, "single", "clip"),
    ((6, 5), 7, "single", "zero"),
    # 72 queries: a full block of 64 and a partial one; the window reaches every border
    ((9, 8), 3, "multi", "zero"),
]


def case_id(case: tuple[object, ...]) -> str:
    return "-".join(str(part) for part in case)


def max_errors() -> dict[str, list[float]]:
    """Per case, the largest absolute difference from the reference of the output, dq, dk and dv. Run under
    TRITON_INTERPRET=1 in a process of its own (see `interpreted_errors`)."""
    errors = {}
    for grid, window, head_mode, border in CASES:
        q, k, v = _qkv_views(grid, heads=2, head_dim=6)  # 6: the kernel pads the head to a power of two
        assert not q.is_contiguous()
        kwargs = dict(grid=grid, window=window, num_prefix=1, border=border, head_mode=head_mode)
        upstream = torch.randn(2, q.shape[2], 12, generator=torch.Generator().manual_seed(1))
        fast = _output_and_grads(spatial_cross_attention, (q, k, v), upstream, kernel="triton", **kwargs)
        reference = _output_and_grads(naive_cross_attention, (q, k, v), upstream, **kwargs)
        errors[case_id((grid, window, head_mode, border))] = [
            (got - expected).abs().max().item() for got, expected in zip(fast, reference, strict=True)
        ]
    return errors


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, list[float]]:
    """`max_errors` in a fresh interpreter with TRITON_INTERPRET=1: Triton reads it as it decorates its own
    library functions on import, and this process imported Triton (through torch) without it."""
    pytest.importorskip("triton")
    script = "import json, tests.test_local_attention_triton as checks; print(json.dumps(checks.max_errors()))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_kernel_matches_naive_reference(interpreted_errors, case):
    for name, error in zip(["output", "dq", "dk", "dv"], interpreted_errors[case_id(case)], strict=True):
        assert error <= TOLERANCE, name


def test_triton_kernel_is_refused_on_the_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv_views((3, 3), heads=1, head_dim=4)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        spatial_cross_attention(q, k, v, (3, 3), window=3, kernel="triton")


@pytest.mark.parametrize("kernel", ["_forward_kernel", "_backward_query_kernel", "_backward_key_kernel"])
def test_the_kernels_compile_for_a_gpu_without_one(kernel):
    """Compiled, not interpreted: Triton's own compiler and ptxas for an H100/H200 (sm_90), bf16, c = 7, for what
    the interpreter does not check (what the compiler accepts, and that the window loop stays a loop: unrolled,
    the c = 7 kernels took minutes to compile)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sa2vp.models import local_attention_triton

    fn = getattr(local_attention_triton, kernel)
    constexprs = {"RADIUS": 3, "BLOCK_Q": 64, "BLOCK_D": 64} | ({"ZERO_BORDER": True} if "forward" in kernel else {})
    signature = {
        name: "constexpr"
        if name in constexprs
        else ("*fp32" if name in ("lse_ptr", "delta_ptr") else "*bf16")
        if name.endswith("_ptr")
        else ("fp32" if name == "scale" else "i32")
        for name in fn.arg_names
    }
    source = ASTSource(
        fn=fn, signature=signature, constexprs={(fn.arg_names.index(name),): v for name, v in constexprs.items()}
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"] and len(compiled.asm["ptx"]) < 1_000_000
