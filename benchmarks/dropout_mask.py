"""Can the portable dropout's mask be drawn faster without changing it?

`PortableDropout` keeps `rand >= p`, one float per element from ATen's CPU generator (a serial Mersenne Twister).
ATen makes such a float from the low 24 bits of one 32-bit draw, and an int32 `random_()` takes the same draw, so
`(draw & 0xFFFFFF) >= ceil(p · 2²⁴)` is the same mask without the float conversion. This checks that the two masks
are equal (over several seeds) and times both on the offline backbone's largest dropout input (its MLP's hidden
activations, both pathways: 128 × 65 × 256).

    python benchmarks/dropout_mask.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch


def float_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The mask as PortableDropout draws it (kept: 1/(1−p), dropped: 0)."""
    return torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))


def integer_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The same draws taken as integers: their low 24 bits against the threshold the float comparison implies."""
    threshold = math.ceil(float(torch.tensor(p, dtype=torch.float32)) * 2**24)
    draws = torch.empty(x.shape, dtype=torch.int32).random_()
    return (draws.bitwise_and_(0xFFFFFF) >= threshold).to(x.dtype).mul_(1.0 / (1.0 - p))


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each function, the functions taking turns (a busy or throttled machine slows all)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128,65,256")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    x = torch.zeros(*(int(side) for side in args.shape.split(",")))
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        expected = float_mask(x, args.p)
        torch.manual_seed(seed)
        if not torch.equal(expected, integer_mask(x, args.p)):
            raise SystemExit(f"seed {seed}: the integer mask differs from the float one")
    print(f"masks equal over seeds 0, 1, 2; shape {tuple(x.shape)}, p {args.p}, {torch.get_num_threads()} threads")
    medians = _interleaved_medians(
        {
            "float (PortableDropout)": lambda: float_mask(x, args.p),
            "integer draws": lambda: integer_mask(x, args.p),
        },
        args.repeats,
    )
    for name, median in medians.items():
        print(f"  {name:<24} {median:6.2f} ms per mask (median, interleaved)")


if __name__ == "__main__":
    main()
