"""Where a training step spends its time, and how many operators and copies it runs.

The model is built from settings exactly as `sa2vp train` builds it (`build_seeded`: with `train.cpu_numerics`
and its portable dropout applied), from a params file and/or dotted settings; without --params, a random
backbone named by --model. One step is forward under autocast, the method's loss and backward. The profile
prints the top operators by device (or CPU) time and, per step, the count of every operator torch dispatched
and of those that copy memory — operator counts, unlike times, mean something on a busy machine.

    python benchmarks/profile_step.py --model vit_base_patch16_224 --batch-size 64 --precision bf16 \
        --set model.sa2vp.window=3
    python benchmarks/profile_step.py --params params.yaml --batch-size 64      # the offline default's step
    python benchmarks/profile_step.py --params params.yaml --batch-size 64 --by-shape --steps 2
"""

from __future__ import annotations

import argparse
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from sa2vp.engine.artifact import build_seeded
from sa2vp.engine.compile import compile_model
from sa2vp.models.backbones import data_config
from sa2vp.settings import load_settings

# Operators that copy or materialise memory (layout changes, casts, concatenations).
COPIES = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::_to_copy", "aten::slice_backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=None, help="a params file (e.g. params.yaml)")
    parser.add_argument("--model", default=None, help="timm backbone with random weights (instead of the params')")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", nargs="?", const="default", default="off", help="train.compile mode")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 untimed)")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument(
        "--by-shape", action="store_true", help="also the top operators per input shape (which tensors cost)"
    )
    args = parser.parse_args()

    values: dict[str, Any] = {"train.device": args.device}
    if args.model is not None:
        values |= {"backbone.name": args.model, "backbone.weights": "random", "backbone.sha256": None}
    if args.image_size is not None:
        values["backbone.img_size"] = args.image_size
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    settings = load_settings(args.params, values)
    device = torch.device(args.device)
    model = build_seeded(settings, 100).to(device)
    compile_model(model, args.compile)
    model.train()
    size = data_config(model.backbone)["input_size"]
    images = torch.randn(args.batch_size, *size, device=device)
    labels = torch.randint(0, 100, (args.batch_size,), device=device)
    autocast: AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    )

    def step() -> None:
        with autocast:
            loss = model.loss(model(images), labels).total
        loss.backward()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if args.by_shape:
        print(f"per input shape, ms per step ({sort}):")
        by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -getattr(e, sort))
        for event in by_shape[: args.rows]:
            print(f"  {getattr(event, sort) / 1e3 / args.steps:9.1f}  {event.key:<34} {str(event.input_shapes)[:90]}")
    counts = Counter({event.key: event.count for event in averages})
    aten = sum(count for key, count in counts.items() if key.startswith("aten::"))
    print(f"per step: {aten / args.steps:.0f} aten operators (nested ones included), of which copies:")
    for key in COPIES:
        print(f"  {key:<24} {counts.get(key, 0) / args.steps:>7.0f}")


if __name__ == "__main__":
    main()
