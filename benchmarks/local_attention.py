"""Time each local-attention kernel (tiled, dense, flex, triton) on the grids that occur, to choose between them.

For each case — ViT-B/16 at 224 (14×14 patches, 12 heads of 64, CLS), ViT-B/16 at 384 (24×24), Swin-B's stage 3
at 224 (14×14, 16 heads of 32, no prefix) — and each window c, this times one `spatial_cross_attention` call
forward + backward to q, k and v (what a training step pays per cross block and direction) and forward alone
(inference), the median over --steps calls after --warmup (the first calls compile the flex and triton kernels).
The table gives each kernel's time and the fastest; `local_attention.choose_kernel` is set from these figures.

    python benchmarks/local_attention.py --device cuda --precision bf16 --json results/local_attention.json
    python benchmarks/local_attention.py --device cpu --batch-size 4 --kernels tiled,dense
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sa2vp.atomic import write_atomic
from sa2vp.models.local_attention import KERNELS, spatial_cross_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    name: str
    grid: tuple[int, int]
    heads: int
    head_dim: int
    num_prefix: int


CASES = {
    "vit-b16-224": Case("vit-b16-224", (14, 14), 12, 64, 1),
    "vit-b16-384": Case("vit-b16-384", (24, 24), 12, 64, 1),
    "swin-b-stage3-224": Case("swin-b-stage3-224", (14, 14), 16, 32, 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--windows", default="1,3,7")
    parser.add_argument(
        "--kernels",
        help="comma-separated; default: all on a GPU, tiled,dense on the CPU (no flex backward, triton needs CUDA)",
    )
    parser.add_argument("--border", choices=["clip", "zero"], default="clip")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    gpu_only = ("flex", "triton")
    kernels = (
        args.kernels.split(",") if args.kernels else [k for k in KERNELS if device.type == "cuda" or k not in gpu_only]
    )
    # One compiled FlexAttention per mask: more masks than Dynamo's default limit in one process.
    torch._dynamo.config.recompile_limit = 64

    rows = []
    for case_name in args.cases.split(","):
        case = CASES[case_name]
        for window in (int(c) for c in args.windows.split(",")):
            times = {k: _time_kernel(case, window, k, args, device, dtype) for k in kernels}
            fastest = min(times, key=lambda k: times[k]["train_ms"])
            rows.append({"case": case_name, "window": window, "fastest_train": fastest, "kernels": times})
            cells = "  ".join(f"{k} {t['train_ms']:7.3f}/{t['eval_ms']:6.3f}" for k, t in times.items())
            print(f"{case_name:18s} c={window}  train/eval ms: {cells}  fastest: {fastest}", flush=True)

    if args.json:
        document = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "settings": {**vars(args), "json": str(args.json)},
            "cases": {name: asdict(case) for name, case in CASES.items()},
            "results": rows,
        }
        write_atomic(args.json, json.dumps(document, indent=2) + "\n")


def _time_kernel(
    case: Case, window: int, kernel: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Median milliseconds of one call: forward + backward (train_ms), forward without gradients (eval_ms)."""
    length = case.num_prefix + case.grid[0] * case.grid[1]
    shape = (args.batch_size, case.heads, length, case.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    upstream = torch.randn(args.batch_size, length, case.heads * case.head_dim, device=device, dtype=dtype)
    call = dict(grid=case.grid, window=window, num_prefix=case.num_prefix, border=args.border, kernel=kernel)

    def train() -> None:
        out = spatial_cross_attention(q, k, v, **call)
        torch.autograd.backward(out, upstream)

    def infer() -> None:
        with torch.no_grad():
            spatial_cross_attention(q, k, v, **call)

    return {"train_ms": _median_ms(train, args, device), "eval_ms": _median_ms(infer, args, device)}


def _median_ms(fn: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    for _ in range(args.warmup):
        fn()
    samples = []
    for _ in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
